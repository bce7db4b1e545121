"""`python -m demo`: run the demo; `python -m demo link STORE down|up`: pull or restore a link."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

from demo.runner import CONTROL, Demo

DEFAULT_STATE = ".demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Run a broker, the hub, three stores with kiosks, a warehouse feed and simulated traffic.")
    parser.add_argument("--state-dir", default=DEFAULT_STATE,
                        help="configs, databases and logs (wiped at every start; default: .demo)")
    parser.add_argument("--rate", type=float, default=5.0, help="traffic: commands per second, all stores (default 5)")
    parser.add_argument("--stores", type=int, default=3, help="number of stores (default 3)")
    parser.add_argument("--products", type=int, default=300, help="catalog size (default 300)")
    parser.add_argument("--port-base", type=int, default=8101,
                        help="kiosk of store-N on port base+N-1 when free (default 8101; 0: any free port)")
    parser.add_argument("--status-every", type=float, default=15.0,
                        help="print the sync table every N seconds (0: never)")
    parser.add_argument("--max-age", type=float, default=20.0,
                        help="agents show nearby/online figures as stale after N seconds without a snapshot")
    parser.add_argument("--tls", action="store_true",
                        help="run the broker on TLS with certificate identity and config/acl (scripts/certs)")
    sub = parser.add_subparsers(dest="command")
    link = sub.add_parser("link", help="pull (down) or restore (up) a store's link in a running demo")
    link.add_argument("store")
    link.add_argument("state", choices=("down", "up"))
    sub.add_parser("status", help="print a running demo's sync table")
    return parser


def send(state_dir: str, line: str) -> int:
    """Send one command to the running demo's control socket and print its answer."""
    path = Path(state_dir).resolve() / CONTROL
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError as exc:
        print(f"demo: no running demo at {path} ({exc.strerror or exc}); start one with scripts/demo", file=sys.stderr)
        return 2
    print(answer.decode().rstrip())
    return 1 if answer.startswith(b"no store") else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "link":
        return send(args.state_dir, f"{args.state} {args.store}")
    if args.command == "status":
        return send(args.state_dir, "status")
    if args.stores < 1 or args.products < 1 or args.rate < 0:
        print("demo: --stores and --products must be at least 1, --rate at least 0", file=sys.stderr)
        return 2
    demo = Demo(Path(args.state_dir), stores=args.stores, products_count=args.products, rate=args.rate,
                port_base=args.port_base, status_every_s=args.status_every, max_age_s=args.max_age,
                tls=args.tls)

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await demo.run(stop)

    return asyncio.run(runner())


if __name__ == "__main__":
    sys.exit(main())
