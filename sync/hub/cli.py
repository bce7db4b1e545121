"""`edge-hub`: the reference hub's command line.

    edge-hub run --config hub.toml              the long-running service (SIGTERM: clean stop)
    edge-hub export --config hub.toml --store ID   the store's events as JSON lines, seq order
    edge-hub stats --config hub.toml            acked positions, counts, conflicts, rejections

`--config` goes before or after the subcommand (the later one wins). The config defaults
to $EDGE_HUB_CONFIG or /etc/edge-hub/hub.toml, with EDGE_HUB__SECTION__KEY overrides.
Exit codes: 0 ok, 2 bad usage or configuration, 3 storage trouble.
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


def cmd_export(args: argparse.Namespace, cfg: HubConfig) -> int:
    from sync.hub.store import HubReader

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

    reader = HubReader(cfg.storage.path)
    try:
        print(json.dumps(reader.stats(), sort_keys=True))
    finally:
        reader.close()
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
    return parser


COMMANDS = {"run": cmd_run, "export": cmd_export, "stats": cmd_stats}


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
