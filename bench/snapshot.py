"""Benchmark: a 100,000-SKU availability snapshot, hub to kiosk.

    .venv/bin/python bench/snapshot.py [--skus 100000] [--nearby 3] [--idle-s 3]

Starts a private mosquitto and a real `edge-agent run` process; runs the hub's publisher
in this process on a hub database seeded with `--nearby` other stores of the region and
a warehouse feed, each holding every SKU. Reports:

* payload bytes of the target store's snapshot: its JSON, and what was sent (zlib when the
  agent's status accepts it, the default under MQTT 5; `--mqtt-protocol 4` sends plain JSON),
* hub compute + publish time (all stores of the region, one `publish_changed` run),
* agent apply time (its `edge_agent_snapshot_apply_seconds`: receive to commit),
* kiosk latency (GET /v1/availability/{sku}, one keep-alive client in a thread, random
  SKUs): p50/p99 while idle, then during the apply, in the same run.

Then a second snapshot where every SKU's figures changed (an update of every row) and a
third where 1% changed, the same way. Targets: apply under 2 s; p99 during apply under
2x idle.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sys
import tempfile
import multiprocessing
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sync.hub import projection  # noqa: E402
from sync.hub.publisher import AvailabilityPublisher  # noqa: E402
from sync.hub.service import HubService  # noqa: E402
from sync.hub.settings import load_hub_config  # noqa: E402
from tests.support.agentproc import AgentProcess  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

TARGET = "store-0042"


def kiosk(port: int, skus: int, stop, out) -> None:
    """Sequential GETs of /v1/availability/{sku} in its own process (so the hub work in the
    bench process cannot slow the client); sends back [(start, latency)] when stopped."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    rnd = random.Random(7)
    samples = []
    while not stop.is_set():
        sku = f"SKU-{rnd.randrange(skus):07d}"
        start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        conn.request("GET", f"/v1/availability/{sku}")
        resp = conn.getresponse()
        resp.read()
        samples.append((start, time.perf_counter() - start))
    out.send(samples)


def window(samples, start: float, end: float) -> list[float]:
    return [took for t, took in samples if start <= t < end]


def snapshot_version(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/sync")
    return json.loads(conn.getresponse().read())["snapshot_version"]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000 if ordered else float("nan")


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def seed(conn, stores: list[str], skus: int, round_: int, changed_every: int) -> None:
    rnd = random.Random(round_)
    conn.execute("DELETE FROM hub_stock")
    rows = []
    for s in stores:
        for i in range(skus):
            base = (i * 7 + hash(s)) % 50
            bump = rnd.randrange(1, 40) if round_ and i % changed_every == 0 else 0
            rows.append((s, f"SKU-{i:07d}", base + bump, 3, 0))
    conn.executemany("INSERT INTO hub_stock(store_id, sku, floor, backroom, reserved) VALUES (?,?,?,?,?)", rows)
    projection.replace_warehouse(conn, "wh-1", round_ + 1, [
        (f"SKU-{i:07d}", (i * 13 + (round_ if i % changed_every == 0 else 0)) % 500) for i in range(skus)])


async def one_round(label: str, service, publisher, agent_port: int, stores, skus, round_,
                    changed_every, idle_s: float) -> dict:
    await service.store.run(lambda conn: seed(conn, stores, skus, round_, changed_every))
    idle_start = time.perf_counter()
    await asyncio.sleep(idle_s)
    idle_end = time.perf_counter()
    before = metric(agent_port, "edge_agent_snapshot_apply_seconds_sum")
    t0 = time.perf_counter()
    published = {s.store_id: s for s in await publisher.publish_changed()}
    hub_s = time.perf_counter() - t0
    snap = published[TARGET]
    deadline = time.monotonic() + 120
    while (snapshot_version(agent_port) or 0) < snap.version:
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: the agent never applied snapshot {snap.version}")
        await asyncio.sleep(0.01)
    applied = time.perf_counter()
    while (apply_s := metric(agent_port, "edge_agent_snapshot_apply_seconds_sum") - before) <= 0:
        await asyncio.sleep(0.01)  # the metric is recorded a moment after the commit
    return {
        "round": label, "json_bytes": len(snap.payload), "sent_bytes": publisher.sent_bytes[TARGET],
        "zlib_bytes": len(zlib.compress(snap.payload, 6)),
        "hub_compute_publish_s": round(hub_s, 3), "stores_published": len(published),
        "agent_apply_s": round(apply_s, 3),
        "publish_to_applied_s": round(applied - t0, 3),
        # The apply window: the agent's own receive-to-commit time, ending when /v1/sync (polled
        # every 10 ms) showed the new version; the hub's compute time before it is not counted.
        "_idle": (idle_start, idle_end), "_during": (applied - apply_s - 0.01, applied),
    }


def latency(result: dict, samples) -> dict:
    idle, during = window(samples, *result.pop("_idle")), window(samples, *result.pop("_during"))
    result.update({
        "idle_n": len(idle), "idle_p50_ms": round(pct(idle, 50), 2), "idle_p99_ms": round(pct(idle, 99), 2),
        "during_n": len(during), "during_p50_ms": round(pct(during, 50), 2),
        "during_p99_ms": round(pct(during, 99), 2),
        "during_max_ms": round(max(during) * 1000, 2) if during else None})
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skus", type=int, default=100_000)
    parser.add_argument("--nearby", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--mqtt-protocol", type=int, choices=(4, 5), default=5,
                        help="the agent's MQTT protocol; 4 (3.1.1) means plain JSON snapshots")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    stores = [TARGET] + [f"store-{i:04d}" for i in range(1, args.nearby + 1)]
    with Broker(work / "broker") as broker:
        (work / "agent").mkdir()
        agent = AgentProcess(work / "agent", TARGET, sections={
            "mqtt": {"host": broker.host, "port": broker.port, "protocol": args.mqtt_protocol},
            "service": {"backup_interval_s": 0}})
        hub_toml = work / "hub.toml"
        hub_toml.write_text(f'[storage]\npath = "{work / "hub.db"}"\n[mqtt]\nhost = "{broker.host}"\n'
                            f'port = {broker.port}\n' + "".join(
                                f'[[stores]]\nid = "{s}"\nregion = "north"\n' for s in stores))
        with agent:
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            receive, send = ctx.Pipe(duplex=False)
            client = ctx.Process(
                target=kiosk, args=(agent.port, args.skus, stop, send), daemon=True)
            client.start()
            service = await HubService.open(load_hub_config(hub_toml, environ={}))
            publisher = await AvailabilityPublisher.attach(service)
            await service.mqtt.start()
            await service.mqtt.wait_connected(10)
            deadline = time.monotonic() + 10
            while args.mqtt_protocol == 5 and not publisher.compresses(TARGET):  # its retained status
                if time.monotonic() > deadline:
                    raise SystemExit("the hub never saw the agent's status")
                await asyncio.sleep(0.01)
            results = []
            try:
                for label, round_, every in (("first (empty agent)", 0, 1), ("all SKUs changed", 1, 1),
                                             ("1% of SKUs changed", 2, 100)):
                    results.append(await one_round(label, service, publisher, agent.port, stores,
                                                   args.skus, round_, every, args.idle_s))
            finally:
                stop.set()
                samples = receive.recv()
                client.join(30)
                await service.mqtt.stop()
                await service.close()
            for result in results:
                print(json.dumps(latency(result, samples)), flush=True)
            assert agent.terminate() == 0


if __name__ == "__main__":
    asyncio.run(main())
