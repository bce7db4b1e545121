"""Benchmark: a 100,000-SKU availability snapshot, hub to kiosk, without and with caps and sources.

    .venv/bin/python bench/snapshot.py [--skus 100000] [--nearby 3] [--sources 5] [--caps 1000]
                                       [--idle-s 3] [--rate 200] [--mqtt-protocol 5] [--wait-quiet 300]
                                       [--workdir DIR]

Processes, all on one private mosquitto on a free loopback port:
- the store: `edge-agent run --config F` as systemd/edge-agent.service starts it (this
  tree, MALLOC_ARENA_MAX=2, normal priority); its sync process receives and applies the
  snapshot into sync.db, `sync.nice` steps nicer;
- the kiosk client: a process of its own at nice 0, GET /v1/availability/SKU-n at `--rate`/s;
- the central side, the broker and `edge-hub run`, under `nice -n 19`.

Rounds, all in one run. Before each, the hub is stopped and the bench (then the only
writer) seeds its database: the target store and `--nearby` other stores of the region,
each holding every SKU. The hub starts, connects, and publishes every store's snapshot at
its first scheduled run, after the kiosk's idle window.

1. current (no caps, no sources): into the empty agent, then every SKU's figures changed,
   then 1% changed;
2. with `--sources` configured partner and supplier sources listing every SKU (fresh) and
   `--caps` capped SKUs (half per store, half chain-wide): every SKU changed (each item
   gains its sources), then 1% changed.

Each round reports: the hub's compute time (its log line "computed N due snapshots ... in
X s": every store's snapshot, off the hub's loop), the target store's JSON and sent
(zlib under MQTT 5) bytes, the apply time (from the snapshot reaching a subscriber of the
bench, i.e. the broker delivering it, to the agent's GET /v1/sync showing its
snapshot_version, polled every 10 ms: receive, inflate, decode, validate and commit in the
sync process), and the kiosk's p50/p99 during that apply window against its idle window.
Targets: apply under 2 s for 100,000 SKUs; kiosk p99 during the apply under 2x idle.
The run first waits up to --wait-quiet seconds for no other test run or bench, and
records what ran beside it anyway and the load average (bench/common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402  (the bench's own subscriber, outside the project's adapter)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.common import Overlap, Tree, bench_lock, free_port, wait_quiet  # noqa: E402
from bench.sync import CENTRAL, Kiosk, latency_stats, start_agent, stop, wait_port, window  # noqa: E402
from sync import protocol  # noqa: E402
from sync.hub import captables, feeds, projection  # noqa: E402
from sync.hub import caps as capcore  # noqa: E402
from sync.hub.store import HubStore  # noqa: E402

TARGET = "store-0042"
BIN = Path(sys.executable).parent
KINDS = ("partner", "supplier")


class Arrivals:
    """Records when each version of the target's snapshot reaches a plain subscriber."""

    def __init__(self, port: int):
        self.seen: dict[int, tuple[float, int]] = {}   # version -> (perf_counter, payload bytes)
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-snapshot-watch",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(protocol.availability_topic("retail", TARGET), 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        at = time.perf_counter()
        props = getattr(msg, "properties", None)
        body = msg.payload
        if getattr(props, "ContentType", None) == protocol.ZLIB_JSON:
            body = zlib.decompressobj().decompress(body, 200)
        found = re.search(rb'"version":(\d+)', body[:200])
        if found:
            with self._cond:
                self.seen[int(found.group(1))] = (at, len(msg.payload))
                self._cond.notify_all()

    def wait_newer(self, than: int, timeout: float = 120) -> tuple[int, float, int]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                newer = [v for v in self.seen if v > than]
                if newer:
                    v = max(newer)
                    return (v, *self.seen[v])
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise SystemExit(f"bench: no snapshot newer than {than} in {timeout}s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def sku(i: int) -> str:
    return f"SKU-{i}"   # the kiosk asks for SKU-0 .. SKU-4999 (bench/sync.py)


def stock_rows(stores: list[str], skus: int, round_: int, every: int) -> list[tuple]:
    """The hub_stock rows of a round. A round of every SKU changed bumps every figure of the
    base; a 1% round (`every` 100) starts from the previous round's figures and bumps every
    100th SKU, so that 1% of the items differ from the snapshot the agent holds."""
    if every > 1 and round_:
        rows = stock_rows(stores, skus, round_ - 1, 1)
        rnd = random.Random(round_)
        return [(s, k, floor + (rnd.randrange(1, 40) if int(k[4:]) % every == 0 else 0), b, r)
                for s, k, floor, b, r in rows]
    rnd = random.Random(round_)
    return [(s, sku(i), (i * 7 + n * 13) % 50 + (rnd.randrange(1, 40) if round_ else 0), 3, 0)
            for n, s in enumerate(stores) for i in range(skus)]


def source_rows(skus: int, k: int, round_: int, every: int) -> list[tuple[str, int]]:
    """A source's list in a round: every figure moved, or (`every` 100) the previous round's with 1% moved."""
    base = round_ - 1 if every > 1 else round_
    return [(sku(i), (i * 13 + k + base + (1 if every > 1 and i % every == 0 else 0)) % 500) for i in range(skus)]


def seed(db: Path, stores: list[str], skus: int, round_: int, every: int, sources: int, caps: int) -> None:
    """The bench's write while the hub is stopped: stock, and with `sources`, feeds and caps."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM hub_stock")
        conn.executemany("INSERT INTO hub_stock(store_id, sku, floor, backroom, reserved) VALUES (?,?,?,?,?)",
                         stock_rows(stores, skus, round_, every))
        now_ms = int(time.time() * 1000)
        for k in range(sources):
            feeds.replace_source(conn, f"src-{k}", round_ + 1, source_rows(skus, k, round_, every), now_ms)
        conn.execute("DELETE FROM caps")
        for c in range(caps):
            cap = capcore.Cap(sku(c * (skus // max(1, caps))), 2 + c % 5, "week", "chain" if c % 2 else "store")
            captables.set_cap(conn, cap, "file", now_ms)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def create_db(db: Path, stores: list[str]) -> None:
    store = await HubStore.open(db, set(stores))
    try:
        await store.run(projection.setup)
        await store.run(feeds.setup)
        await store.run(lambda conn: captables.setup(conn, lambda _s, at: at[:10]))
    finally:
        await store.close()


def hub_toml(work: Path, port: int, stores: list[str], sources: int, interval_s: float) -> Path:
    path = work / "hub.toml"
    text = (f'[storage]\npath = "{work / "hub.db"}"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[availability]\npublish_interval_s = {interval_s}\nrefresh_s = 3600\n[log]\nformat = "text"\n')
    text += "".join(f'[[sources]]\nid = "src-{k}"\nname = "Source {k}"\nkind = "{KINDS[k % 2]}"\n'
                    f"lead_time_s = {86400 * (k + 1)}\nstale_after_s = 86400\n" for k in range(sources))
    text += "".join(f'[[stores]]\nid = "{s}"\nregion = "north"\n' for s in stores)
    path.write_text(text)
    return path


def start_hub(config: Path, out: Path) -> subprocess.Popen:
    mark = out.stat().st_size if out.exists() else 0
    proc = subprocess.Popen([*CENTRAL, str(BIN / "edge-hub"), "run", "--config", str(config)],
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "connected to" not in out.read_text(errors="replace")[mark:]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: edge-hub did not connect; see {out}")
        time.sleep(0.05)
    return proc


def snapshot_version(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/sync")
    return json.loads(conn.getresponse().read())["snapshot_version"] or 0


def compute_s(out: Path, mark: int) -> float | None:
    found = re.findall(r"computed \d+ due snapshots of \d+ stores in ([0-9.]+) s", out.read_text()[mark:])
    return float(found[0]) if found else None


def one_round(label, work, args, stores, api_port, arrivals, sources, round_, every) -> dict:
    db, out = work / "hub.db", work / "hub.out"
    seed(db, stores, args.skus, round_, every, sources, args.caps if sources else 0)
    config = hub_toml(work, args.port, stores, sources, args.idle_s + 3)
    mark = out.stat().st_size if out.exists() else 0
    held = snapshot_version(api_port)
    hub = start_hub(config, out)
    try:
        time.sleep(0.5)
        idle = (time.perf_counter(), time.perf_counter() + args.idle_s)
        time.sleep(args.idle_s)
        version, arrived, sent = arrivals.wait_newer(held)
        deadline = time.monotonic() + 120
        while snapshot_version(api_port) < version:
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: the agent never applied snapshot {version}")
            time.sleep(0.01)
        applied = time.perf_counter()
        while compute_s(out, mark) is None:
            time.sleep(0.05)
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.wait(60)
    return {"round": label, "hub_compute_s": compute_s(out, mark), "json_bytes": json_bytes(out, mark, version),
            "sent_bytes": sent, "rows_changed": rows_changed(work / "agent.out", version),
            "apply_s": round(applied - arrived, 3), "_idle": idle, "_during": (arrived, applied)}


def rows_changed(agent_out: Path, version: int) -> int | None:
    """The item rows the agent's sync wrote for that snapshot (its log line "... N changed")."""
    found = re.findall(rb"applied availability snapshot %d .*?, (\d+) changed" % version, agent_out.read_bytes())
    return int(found[-1]) if found else None


def json_bytes(out: Path, mark: int, version: int) -> int | None:
    """The target snapshot's JSON size, from the hub's "published availability" log line."""
    found = re.search(rf"published availability {version} for {TARGET} \(\d+ items, (\d+) bytes(?:, zlib of (\d+))?",
                      out.read_text()[mark:])
    return int(found.group(2) or found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skus", type=int, default=100_000)
    parser.add_argument("--nearby", type=int, default=3)
    parser.add_argument("--sources", type=int, default=5)
    parser.add_argument("--caps", type=int, default=1000)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--mqtt-protocol", type=int, choices=(4, 5), default=5,
                        help="the agent's MQTT protocol; 4 (3.1.1) means plain JSON snapshots")
    parser.add_argument("--wait-quiet", type=float, default=300.0,
                        help="seconds to wait for no other test run or bench first")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    with bench_lock():
        return run(args, work)


def run(args, work: Path) -> int:
    stores = [TARGET] + [f"store-{i:04d}" for i in range(1, args.nearby + 1)]
    args.port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {args.port} 127.0.0.1\nallow_anonymous true\n"
                                         "persistence false\nset_tcp_nodelay true\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([*CENTRAL, mosquitto, "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = kiosk = arrivals = None
    results = []
    waited = wait_quiet(args.wait_quiet)
    overlap = Overlap()
    try:
        wait_port(args.port)
        asyncio.run(create_db(work / "hub.db", stores))
        api_port = free_port()
        (work / "agent").mkdir(exist_ok=True)
        config = work / "agent.toml"
        config.write_text(f'[store]\nid = "{TARGET}"\n[storage]\npath = "{work / "agent" / "events.db"}"\n'
                          f'[api]\nport = {api_port}\n[mqtt]\nport = {args.port}\nprotocol = {args.mqtt_protocol}\n'
                          'reconnect_min_s = 0.1\n[service]\nbackup_interval_s = 0\n[log]\nformat = "text"\n')
        agent = start_agent(Tree(ROOT), config, api_port, work / "agent.out")
        arrivals = Arrivals(args.port)
        kiosk = Kiosk(api_port, args.rate).start()
        time.sleep(1.0)  # the agent's retained status reaches the broker (the hub reads it: zlib or not)
        for label, sources, round_, every in (
                ("current: first (empty agent)", 0, 0, 1), ("current: all SKUs changed", 0, 1, 1),
                ("current: 1% changed", 0, 2, 100),
                (f"caps + {args.sources} sources: all SKUs changed", args.sources, 3, 1),
                (f"caps + {args.sources} sources: 1% changed", args.sources, 4, 100)):
            print(f"bench: {label} ...", file=sys.stderr, flush=True)
            results.append(one_round(label, work, args, stores, api_port, arrivals, sources, round_, every))
            results[-1]["load_avg_1m"] = round(os.getloadavg()[0], 2)
    finally:
        samples = kiosk.stop() if kiosk else []
        if arrivals:
            arrivals.close()
        if agent:
            stop(agent)
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
    met_apply = met_kiosk = True
    for result in results:
        idle, during = window(samples, *result.pop("_idle")), window(samples, *result.pop("_during"))
        result["kiosk_idle"], result["kiosk_during"] = latency_stats(idle), latency_stats(during)
        ratio = result["kiosk_during"]["p99_ms"] / result["kiosk_idle"]["p99_ms"]
        result["p99_ratio"] = round(ratio, 2)
        met_apply &= result["apply_s"] < 2.0
        met_kiosk &= ratio < 2.0
        print(json.dumps(result), flush=True)
    print(json.dumps({"skus": args.skus, "stores": len(stores), "sources": args.sources, "caps": args.caps,
                      "mqtt_protocol": args.mqtt_protocol, "central": " ".join(CENTRAL),
                      "waited_for_quiet_s": waited, "ran_beside": overlap.stop(),
                      "apply_under_2s": met_apply, "kiosk_p99_under_2x_idle": met_kiosk}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
