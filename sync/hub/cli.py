"""`edge-hub`: the reference hub's command line.

    edge-hub run --config hub.toml              the long-running service (SIGTERM: clean stop)
    edge-hub export --config hub.toml --store ID   the store's events as JSON lines, seq order
    edge-hub stats --config hub.toml            acked positions, counts, conflicts, rejections
    edge-hub stores --config hub.toml           each store's ack, rev, backlog estimate, last contact (JSON lines)
    edge-hub caps set SKU --limit N --period day|week|month [--scope store|chain] [--store ID]
    edge-hub caps clear SKU                     publish (retained) to P/caps/{sku}; the hub applies it
    edge-hub caps list                          the caps the hub holds and the allowances it sent (JSON lines)
    edge-hub epoch [--new]                      the hub record's epoch; --new after restoring PostgreSQL in place
    edge-hub replay --store ID [--from SEQ]     recompute the store's projection rows from its held events

`caps set` and `caps clear` publish to the caps feed and return once the broker has it:
the running hub stays the only writer of hub.db (`caps list` reads it read-only). A cap
that does not fit is refused before anything is published (exit 2 naming the field).

`--config` goes before or after the subcommand (the later one wins). The config defaults
to $EDGE_HUB_CONFIG or /etc/edge-hub/hub.toml, with EDGE_HUB__SECTION__KEY overrides.
Exit codes: 0 ok, 2 bad usage, configuration or cap, 3 storage trouble, 4 broker unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from common.errors import StorageError
from common.logsetup import setup_logging
from common.config import ConfigError
from sync.hub.settings import DEFAULT_CONFIG, HubConfig, load_hub_config


def _config(args: argparse.Namespace) -> HubConfig:
    path = args.config or os.environ.get("EDGE_HUB_CONFIG") or DEFAULT_CONFIG
    if not args.config and not os.path.exists(path):
        path = None
    return load_hub_config(path)


def cmd_run(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.service import serve

    setup_logging(cfg.log.level, cfg.log.format)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    asyncio.run(runner())
    return 0


def _on_postgres(cfg: HubConfig, fn):
    """Run `await fn(storage)` on the hub's PostgreSQL storage; return its result."""
    async def run():
        from sync.hub.pg import PgStorage

        storage = await PgStorage.open(cfg.storage.url, cfg.store_ids(), pool_size=1)
        try:
            return await fn(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def cmd_export(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.store import HubReader

    if cfg.storage.url:
        async def export(storage) -> None:
            out = sys.stdout.buffer
            async for body in storage.iter_bodies(args.store):
                out.write(body + b"\n")
            out.flush()

        _on_postgres(cfg, export)
        return 0

    reader = HubReader(cfg.storage.path)
    try:
        out = sys.stdout.buffer
        for body in reader.iter_bodies(args.store):
            out.write(body + b"\n")
        out.flush()
    finally:
        reader.close()
    return 0


def cmd_stats(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.store import HubReader

    if cfg.storage.url:
        print(json.dumps(_on_postgres(cfg, lambda storage: storage.stats()), sort_keys=True))
        return 0

    reader = HubReader(cfg.storage.path)
    try:
        print(json.dumps(reader.stats(), sort_keys=True))
    finally:
        reader.close()
    return 0


def cmd_stores(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.ops import store_lines
    from sync.hub.engines import is_postgres

    if is_postgres(cfg):
        from sync.hub.engines import open_storage

        async def read() -> list[dict]:
            storage = await open_storage(cfg)
            try:
                return await storage.store_rows()
            finally:
                await storage.close()

        rows = asyncio.run(read())
    else:
        # Read-only: the running hub stays hub.db's only writer.
        from sync.hub.reader import HubReader

        reader = HubReader(cfg.storage.path)
        try:
            held = {s: m for s, m in reader._all("SELECT store_id, MAX(seq) FROM events GROUP BY store_id")}
            conflicts = dict(reader._all("SELECT store_id, COUNT(*) FROM conflicts GROUP BY store_id"))
            rows = [{"store_id": s, "acked_seq": a, "rev": r, "incarnation": i, "updated_at": u,
                     "max_seq": held.get(s, 0), "conflicts": conflicts.get(s, 0)}
                    for s, a, r, i, u in reader._all("SELECT store_id, acked_seq, ack_rev, incarnation, updated_at"
                                                      " FROM stores ORDER BY store_id")]
        finally:
            reader.close()
    for line in store_lines(rows, cfg.store_ids()):
        print(json.dumps(line, sort_keys=True))
    return 0


def cmd_caps(args: argparse.Namespace, cfg: HubConfig) -> int:
    if args.caps_command == "list":
        return _caps_list(cfg)
    from sync import protocol
    from sync.hub import caps as capcore

    try:
        if not capcore.SKU.match(args.sku):
            raise capcore.CapError("sku", f"{args.sku!r} is not a valid SKU")
        if args.caps_command == "clear":
            payload = b""
        else:
            cap = capcore.check(args.sku, args.limit, args.period, args.scope, args.store, stores=cfg.store_ids())
            payload = protocol.encode(protocol.CapMessage(sku=cap.sku, limit=cap.limit, period=cap.period,
                                                          scope=cap.scope, store_id=cap.store_id))
    except capcore.CapError as exc:
        print(f"edge-hub: caps {args.caps_command}: {exc}", file=sys.stderr)
        return 2
    topic = protocol.caps_topic(cfg.mqtt.topic_prefix, args.sku)
    try:
        asyncio.run(_publish_retained(cfg, topic, payload, args.timeout))
    except Exception as exc:  # no broker, refused credentials, no PUBACK in time
        print(f"edge-hub: caps {args.caps_command}: could not publish to {topic}: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 4
    print(json.dumps({"topic": topic, "cap": json.loads(payload) if payload else None}))
    return 0


async def _publish_retained(cfg: HubConfig, topic: str, payload: bytes, timeout: float) -> None:
    import msgspec

    from common.aio import wait_for
    from sync.mqtt import MqttClient

    # A client id of its own: reusing the hub's would disconnect the running hub.
    mqtt = msgspec.structs.replace(cfg.mqtt, client_id="")
    client = MqttClient.from_settings(mqtt, f"edge-hub-{cfg.hub.id}-cli-{os.getpid()}")
    await client.start()
    try:
        await client.wait_connected(timeout)
        await wait_for(client.publish(topic, payload, qos=1, retain=True), timeout)
    finally:
        await client.stop()


def _caps_list(cfg: HubConfig) -> int:
    from sync.hub import captables
    from sync.hub.store import HubReader

    reader = HubReader(cfg.storage.path)
    try:
        caps = captables.effective_caps(reader.conn)
        history = captables.grant_history(reader.conn, caps)
    except Exception as exc:  # a hub database from before caps has no caps table
        if "no such table" not in str(exc):
            raise
        caps, history = {}, {}
    finally:
        reader.close()
    for sku, (cap, origin) in sorted(caps.items()):
        row = {"sku": sku, "limit": cap.limit, "period": cap.period, "scope": cap.scope,
               "store_id": cap.store_id, "origin": origin}
        if cap.scope == "chain":
            row["allowances"] = {store: rows[-1][1] for store, rows in sorted(history.get(sku, {}).items())}
        print(json.dumps(row))
    return 0


def cmd_epoch(args: argparse.Namespace, cfg: HubConfig) -> int:
    """Print the epoch the hub's acks carry; `--new`: give the PostgreSQL record a new one."""
    if not cfg.storage.url:
        print(json.dumps({"engine": "sqlite", "epoch": None,
                          "note": "a SQLite hub takes a new epoch each time it opens its database"}))
        return 0

    epoch = _on_postgres(cfg, lambda storage: storage.new_epoch() if args.new else storage.epoch())
    print(json.dumps({"engine": "postgresql", "epoch": epoch, "new": bool(args.new)}))
    return 0


def cmd_replay(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.replay import ReplayError, replay

    try:
        out = replay(cfg, args.store, args.from_seq)
    except ReplayError as exc:
        print(f"edge-hub: replay: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = f"TOML config (default $EDGE_HUB_CONFIG or {DEFAULT_CONFIG})"
    # Every subcommand takes --config too (`edge-hub run --config F`, as the unit writes it).
    # SUPPRESS: a subcommand without it leaves the value given before the subcommand alone.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(prog="edge-hub", description="The reference hub for Store Edge Agents.")
    parser.add_argument("--config", help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[after], help="run the hub service")
    export = sub.add_parser("export", parents=[after], help="print a store's events as JSON lines in seq order")
    export.add_argument("--store", required=True, help="store id")
    sub.add_parser("stats", parents=[after], help="print acked positions and counters as JSON")
    sub.add_parser("stores", parents=[after], help="print each store's ack, backlog estimate and last contact")
    caps = sub.add_parser("caps", parents=[after], help="set, clear or list sales caps")
    caps_sub = caps.add_subparsers(dest="caps_command", required=True)
    cap_set = caps_sub.add_parser("set", parents=[after], help="publish a SKU's cap to P/caps/{sku}")
    cap_set.add_argument("sku")
    cap_set.add_argument("--limit", type=int, required=True, help="units per period (0 or more)")
    cap_set.add_argument("--period", required=True, help="day, week or month (calendar, store's time zone)")
    cap_set.add_argument("--scope", default="store", help="store (each store, or --store only) or chain")
    cap_set.add_argument("--store", default=None, help="with scope store: only this store")
    cap_clear = caps_sub.add_parser("clear", parents=[after], help="clear a SKU's cap (empty retained message)")
    cap_clear.add_argument("sku")
    for p in (cap_set, cap_clear):
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")
    caps_sub.add_parser("list", parents=[after], help="print the caps the hub holds as JSON lines")
    epoch = sub.add_parser("epoch", parents=[after], help="print the hub record's epoch (JSON)")
    epoch.add_argument("--new", action="store_true",
                       help="replace it (PostgreSQL restored in place: stores must not trust older acks)")
    replay = sub.add_parser("replay", parents=[after], help="recompute a store's projection rows from its events")
    replay.add_argument("--store", required=True, help="store id")
    replay.add_argument("--from", dest="from_seq", type=int, default=1,
                        help="rebuild the SKUs that events from this seq on touch (default 1: every row)")
    return parser


COMMANDS = {"run": cmd_run, "export": cmd_export, "stats": cmd_stats, "stores": cmd_stores, "caps": cmd_caps,
            "epoch": cmd_epoch, "replay": cmd_replay}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args, cfg)
    except StorageError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        return 0
