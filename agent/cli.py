"""`edge-agent`: the agent's command line.

Every subcommand reads the TOML config (`--config PATH`, before or after the subcommand,
the later one winning; default $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml) with
EDGE_AGENT__SECTION__KEY overrides. `run` is the store's service and starts `sync` as its
child unless `--no-sync`; `sync` runs the store's sync process alone. Exit codes: 0 ok,
1 a check failed (verify) or a write was refused, 2 bad usage or configuration,
3 storage trouble.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import uuid

import msgspec

from agent import events as ev
from common.errors import StorageError
from agent.inventory import Refused
from agent.settings import DEFAULT_CONFIG, AgentConfig, ConfigError, config_path, load_config

def _config_path(args: argparse.Namespace) -> str | None:
    return config_path(args.config)


def _config(args: argparse.Namespace) -> AgentConfig:
    # No file: defaults plus environment (store.id must then come from EDGE_AGENT__STORE__ID).
    path = _config_path(args)
    try:
        return load_config(path, AgentConfig, "EDGE_AGENT")
    except ConfigError as exc:
        hint = "" if path else f" (no --config given and {DEFAULT_CONFIG} does not exist)"
        raise ConfigError(f"{exc}{hint}") from None


def _open_log(cfg: AgentConfig):
    from agent.log import SqliteEventLog
    from agent.settings import sync_db_path
    from agent.syncview import HeldCaps

    # A write from the command line keeps the store's sales caps, as one through the API does.
    return SqliteEventLog.open(cfg.storage.path, cfg.store.id, synchronous=cfg.storage.synchronous,
                               checkpoint_every=cfg.storage.checkpoint_every, caps_for=HeldCaps(sync_db_path(cfg)))


def _reader(cfg: AgentConfig):
    from agent.reader import LogReader

    return LogReader(cfg.storage.path)


def cmd_init(args: argparse.Namespace, cfg: AgentConfig) -> int:
    async def run() -> int:
        log = await _open_log(cfg)
        last = log.last_seq
        await log.close()
        return last

    last = asyncio.run(run())
    print(f"log ready at {cfg.storage.path} for store {cfg.store.id} (last seq {last})")
    return 0


_RECORD_FIELDS = ("sku", "qty", "location", "from", "to", "counted", "delta", "reason",
                  "reservation_id", "ref", "occurred_at", "ttl_s", "expires_at")


def cmd_record(args: argparse.Namespace, cfg: AgentConfig) -> int:
    intent: dict = {"type": args.type}
    for name in _RECORD_FIELDS:
        value = getattr(args, name.replace("from", "from_"), None)
        if value is not None:
            intent[name] = value
    body = {"command_id": args.command_id or str(uuid.uuid4()), "events": [intent]}
    try:
        command = ev.decode_command(msgspec.json.encode(body))
    except msgspec.ValidationError as exc:
        field = ev.field_of(exc) or "body"
        print(f"record: refused: {field.replace('events[0].', '')}: {exc}", file=sys.stderr)
        return 1

    async def run():
        log = await _open_log(cfg)
        try:
            return await log.append(command)
        finally:
            await log.close()

    try:
        result = asyncio.run(run())
    except Refused as refusal:
        print(f"record: refused ({refusal.code}): {refusal.message}", file=sys.stderr)
        return 1
    note = " (duplicate: already recorded)" if result.duplicate else ""
    print(f"recorded {args.type} as seq {result.first_seq}{note}")
    return 0


def _print_stock(rows: list[dict]) -> None:
    print(f"{'sku':<24} {'floor':>8} {'backroom':>9} {'reserved':>9} {'available':>10} {'last_seq':>9}")
    for r in rows:
        print(f"{r['sku']:<24} {r['floor']:>8} {r['backroom']:>9} {r['reserved']:>9} "
              f"{r['available']:>10} {r['last_seq']:>9}")


def cmd_stock(args: argparse.Namespace, cfg: AgentConfig) -> int:
    if args.as_of is not None and args.as_of_seq is not None:
        print("stock: give --as-of-seq or --as-of, not both", file=sys.stderr)
        return 2
    if args.as_of is not None and not ev.valid_time(args.as_of):
        print(f"stock: --as-of {args.as_of!r} is not an RFC 3339 UTC time such as 2026-11-27T13:00:00Z",
              file=sys.stderr)
        return 2
    reader = _reader(cfg)
    try:
        if args.sku is None:
            if args.as_of_seq is not None or args.as_of is not None:
                print("stock: --as-of-seq and --as-of need a SKU", file=sys.stderr)
                return 2
            rows = reader.all_stock()
        else:
            seq = reader.seq_at(ev.to_ms_precision(args.as_of)) if args.as_of is not None else args.as_of_seq
            row = reader.stock(args.sku) if seq is None else reader.stock_as_of(args.sku, seq)
            if row is None:
                by = f" by {args.as_of}" if args.as_of else (f" by seq {seq}" if seq is not None else "")
                print(f"stock: no events for {args.sku}{by}", file=sys.stderr)
                return 1
            rows = [row]
    finally:
        reader.close()
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
    else:
        _print_stock(rows)
    return 0


def cmd_events(args: argparse.Namespace, cfg: AgentConfig) -> int:
    reader = _reader(cfg)
    try:
        for seq, body in reader.events_after(args.after_seq, args.limit):
            event = ev.decode_event(body)
            fields = {k: v for k, v in msgspec.structs.asdict(event).items()
                      if k not in ("seq", "event_id", "store_id", "recorded_at", "command_id", "schema")
                      and v is not None and v is not False}
            occurred = fields.pop("occurred_at")
            detail = " ".join(f"{k.rstrip('_')}={v}" for k, v in fields.items())
            print(f"{seq:>8}  {occurred}  {ev.type_of(event):<22} {detail}")
    finally:
        reader.close()
    return 0


def cmd_export(args: argparse.Namespace, cfg: AgentConfig) -> int:
    reader = _reader(cfg)
    out = sys.stdout.buffer
    try:
        for body in reader.iter_bodies(args.after_seq):
            out.write(body)
            out.write(b"\n")
    finally:
        reader.close()
        out.flush()
    return 0


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ev", unit_scale=True, disable=not sys.stderr.isatty())


def cmd_verify(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.verify import verify_log

    reader = _reader(cfg)
    total = reader.last_seq()
    reader.close()
    with _progress(total, "verify") as bar:
        report = verify_log(cfg.storage.path, progress=bar.update)
    print(report.render())
    return 0 if report.ok else 1


def cmd_rebuild(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.verify import rebuild_projections

    async def run() -> int:
        log = await _open_log(cfg)  # takes the writer lock: refuses while the service runs
        await log.close()
        conn = sqlite3.connect(cfg.storage.path, isolation_level=None)
        try:
            total = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            with _progress(total, "rebuild") as bar:
                return rebuild_projections(conn, cfg.storage.checkpoint_every, progress=bar.update)
        finally:
            conn.close()

    count = asyncio.run(run())
    print(f"rebuilt projections from {count} events")
    return 0


def cmd_run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent import app

    cfg.check_exposure()
    return app.main(cfg, config_path=_config_path(args), start_sync=not args.no_sync)


def cmd_sync(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """Replace this process with the store's sync process, `python -m sync`; never returns.

    An exec, not an import: the agent's package uses nothing of `sync`, and the process
    (pid, signals, exit status) is then the sync process's own. The config has been read
    once here, so a bad one exits 2 before anything starts; without a file the child reads
    the same EDGE_AGENT__* environment.
    """
    path = _config_path(args)
    argv = [sys.executable, "-m", "sync", *(["--config", os.path.abspath(path)] if path else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


CONFIG_HELP = f"TOML config (default $EDGE_AGENT_CONFIG or {DEFAULT_CONFIG})"


class _Sub:
    """Adds subcommands that also take --config after their name (as a systemd unit writes it)."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        parser = self._sub.add_parser(name, **kwargs)
        # SUPPRESS: without the option here, the value given before the subcommand stays.
        parser.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Store edge inventory agent")
    parser.add_argument("--config", help=CONFIG_HELP)
    sub = _Sub(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    run = sub.add_parser("run", help="run the store's service (HTTP API, kiosk, and its sync process)")
    run.add_argument("--no-sync", action="store_true", dest="no_sync",
                     help="do not start edge-agent sync (it runs under a unit of its own)")
    run.set_defaults(fn=cmd_run)
    sub.add_parser("sync", help="run the store's sync process alone (MQTT uplink and downlink)").set_defaults(
        fn=cmd_sync)
    sub.add_parser("init", help="create the log (idempotent)").set_defaults(fn=cmd_init)

    rec = sub.add_parser("record", help="append one event from the shell")
    rec.add_argument("type", choices=ev.EVENT_TYPES)
    rec.add_argument("--sku")
    rec.add_argument("--qty", type=int)
    rec.add_argument("--location", choices=ev.LOCATIONS)
    rec.add_argument("--from", dest="from_", choices=ev.LOCATIONS)
    rec.add_argument("--to", choices=ev.LOCATIONS)
    rec.add_argument("--counted", type=int)
    rec.add_argument("--delta", type=int)
    rec.add_argument("--reason", choices=("damaged", "shrink", "found", "correction"))
    rec.add_argument("--reservation-id", dest="reservation_id")
    rec.add_argument("--ref")
    rec.add_argument("--occurred-at", dest="occurred_at")
    rec.add_argument("--ttl-s", type=int, dest="ttl_s", help="reserved: a lease of this many seconds")
    rec.add_argument("--expires-at", dest="expires_at", help="reserved: a lease ending at this time")
    rec.add_argument("--command-id", dest="command_id", help="idempotency key (default: a new UUID)")
    rec.set_defaults(fn=cmd_record)

    st = sub.add_parser("stock", help="current stock (all SKUs, or one) or stock as of a seq or a time")
    st.add_argument("sku", nargs="?")
    st.add_argument("--as-of-seq", type=int, dest="as_of_seq")
    st.add_argument("--as-of", dest="as_of", metavar="TIME",
                    help="the stock as the log stood at this RFC 3339 UTC time (docs/events.md)")
    st.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    st.set_defaults(fn=cmd_stock)

    evs = sub.add_parser("events", help="list events in seq order")
    evs.add_argument("--after-seq", type=int, default=0, dest="after_seq")
    evs.add_argument("--limit", type=int, default=100)
    evs.set_defaults(fn=cmd_events)

    exp = sub.add_parser("export", help="the events as JSON lines in seq order")
    exp.add_argument("--after-seq", type=int, default=0, dest="after_seq")
    exp.set_defaults(fn=cmd_export)

    sub.add_parser("verify", help="replay and check the whole log; exit 1 with a report if not").set_defaults(
        fn=cmd_verify)
    sub.add_parser("rebuild", help="rebuild the projections from the log (service stopped)").set_defaults(
        fn=cmd_rebuild)
    from agent.backup import add_backup_parser, add_restore_parser
    from agent.rehydrate import add_rehydrate_parser

    add_restore_parser(sub)
    add_backup_parser(sub)
    add_rehydrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
        return args.fn(args, cfg)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
