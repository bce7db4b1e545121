"""Benchmark: drain a backlog from the agent's log into the hub, against the raw stages.

    .venv/bin/python bench/sync.py [--events 200000] [--batch 500] [--rounds 3] [--hub-cpu spare|shared]
                                     [--agent-cpu unit|other] [--kiosk-cpu device|shared] [--workdir DIR]

Steps, all in one run, on one private mosquitto on a free loopback port:
0. The hub and the broker stand for central machines: by default (--hub-cpu spare) they
   run under SCHED_IDLE and take only the CPU the store's side leaves idle. The agent
   runs as the shipped systemd unit starts it (--agent-cpu unit): its main thread, the
   event loop, under SCHED_RR priority 1 with reset-on-fork. The kiosk client runs in a
   process of its own and stands for the kiosk, a device of its own on the store's LAN:
   by default (--kiosk-cpu device) under SCHED_FIFO priority 1, so its own wait for one
   of this machine's cores is not timed as the agent's answer.
1. Build an agent log of N events (not timed).
2. Kiosk idle: `edge-agent run` with sync disabled; p50/p99 of GET /v1/availability/{sku}
   at a steady 100 requests/s.
3. End to end, --rounds times (default 3): `edge-hub run` (synchronous=FULL) on an empty
   database and `edge-agent run` with sync on, the agent's log restored to its built state;
   the time from the agent being ready until the hub's retained ack reaches N (every event
   committed at the hub and acked), with the kiosk load running throughout the drain. The
   rate is the median round's; the kiosk's drain latencies are pooled over the rounds.
4. Raw MQTT: plain paho publishing the same payload bytes at QoS 1 to the same broker
   (same in-flight window), until every PUBACK is in.
5. Raw SQLite: plain sqlite3 inserting the same rows in the same batch sizes into the
   hub's table layout, WAL, synchronous=FULL, one commit per batch.
Prints a JSON summary and the verdict against the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402  (the benchmark's raw stage uses paho directly)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.common import build_log, free_port  # noqa: E402
from agent.reader import LogReader  # noqa: E402
from sync import protocol  # noqa: E402
from sync.hub.store import SCHEMA_SQL as HUB_SCHEMA  # noqa: E402

STORE = "store-0042"
SETTLE_S = 1.0     # --start reconnect: after the agent is ready, before the idle window
IDLE_S = 3.0       # --start reconnect: the kiosk's idle window, the link still stalled
BIN = Path(sys.executable).parent



def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def batches(db: Path, size: int, cap: int) -> list[tuple[int, int, list[bytes]]]:
    reader = LogReader(db)
    out, after = [], 0
    try:
        while True:
            rows = reader.events_after(after, size)
            if not rows:
                return out
            total, keep = 0, len(rows)
            for i, (_, body) in enumerate(rows):
                total += len(body) + 1
                if total > cap - 128 and i > 0:
                    keep = i
                    break
            rows = rows[:keep]
            out.append((rows[0][0], rows[-1][0], [b for _, b in rows]))
            after = rows[-1][0]
    finally:
        reader.close()


def _kiosk_requests(port: int, rate: float, go, stop, out, realtime: bool) -> None:
    """The kiosk's loop, in its own process: from `go` until `stop`, GET at a steady rate;
    send (start, latency) of each request, start on the machine's monotonic clock."""
    if realtime:
        import os

        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    out.send("ready")
    go.wait()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples, i, next_at = [], 0, time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", f"/v1/availability/SKU-{i % 5000}")
        conn.getresponse().read()
        samples.append((t0, time.perf_counter() - t0))
        i += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
    conn.close()
    out.send(samples)


class Kiosk:
    """GET /v1/availability/{sku} at a steady rate; records latencies.

    The client runs in a process of its own, as a kiosk would: in this one it would share
    the interpreter lock with the ack watcher's MQTT thread and time that too.
    """

    realtime = True   # --kiosk-cpu device

    def __init__(self, port: int, rate: float = 100.0):
        ctx = multiprocessing.get_context("spawn")
        self._go, self._stop = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_kiosk_requests, daemon=True,
                                 args=(port, rate, self._go, self._stop, send, self.realtime))
        self._proc.start()
        assert self._recv.recv() == "ready"

    def start(self) -> "Kiosk":
        """Start the requests (the process is already up: its start-up is not in the window)."""
        self._go.set()
        return self

    def stop(self) -> list[tuple[float, float]]:
        """Stop the requests; return (start on time.perf_counter's clock, seconds) of each."""
        self._stop.set()
        samples = self._recv.recv()
        self._proc.join(10)
        return samples


def window(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """The latencies of the requests that started in [start, end)."""
    return [lat for t, lat in samples if start <= t < end]


def latency_stats(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"requests": len(lat), "p50_ms": round(1000 * lat[len(lat) // 2], 3),
            "p90_ms": round(1000 * lat[int(len(lat) * 0.9)], 3),
            "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 3), "max_ms": round(1000 * lat[-1], 3),
            "slowest_ms": [round(1000 * x, 2) for x in lat[-5:]]}


def clear_retained(port: int, topic: str) -> None:
    """Remove a retained message (the previous round's hub ack) from the broker."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-clear-{uuid.uuid4().hex[:6]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def write_agent_config(path: Path, db: Path, api_port: int, mqtt_port: int, sync: bool, batch: int,
                       inflight: int) -> None:
    path.write_text(
        f'[store]\nid = "{STORE}"\n[storage]\npath = "{db}"\n[api]\nport = {api_port}\n'
        f'[mqtt]\nport = {mqtt_port}\nreconnect_min_s = 0.1\n'
        f'[sync]\nenabled = {"true" if sync else "false"}\nbatch_max_events = {batch}\n'
        f'max_inflight = {inflight}\n'
        '[service]\nbackup_interval_s = 0\n[log]\nformat = "text"\n')


AGENT_LAUNCHER: list[str] = []   # --agent-cpu unit: as systemd/edge-agent.service starts it
UNIT_LAUNCHER = ["chrt", "--rr", "--reset-on-fork", "1"]


def start_agent(config: Path, api_port: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([*AGENT_LAUNCHER, str(BIN / "edge-agent"), "--config", str(config), "run"],
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError("edge-agent not ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


class AckWatch:
    def __init__(self, port: int, target: int):
        self.target, self.done = target, threading.Event()
        self.acked = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, *a: c.subscribe(protocol.ack_topic("retail", STORE), 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.payload:
            self.acked = json.loads(msg.payload)["acked_seq"]
            if self.acked >= self.target:
                self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_mqtt(port: int, payloads: list[bytes], inflight: int) -> float:
    """Publish every payload at QoS 1, `inflight` at a time; return the seconds until all PUBACKs."""
    done = threading.Event()
    acked = [0]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(inflight)

    def on_publish(c, userdata, mid, rc, props):
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.perf_counter()
    for payload in payloads:
        client.publish("bench/raw/events", payload, qos=1)
    done.wait(300)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return elapsed


def raw_sqlite(path: Path, batches_: list[tuple[int, int, list[bytes]]]) -> float:
    """Insert the same rows in the same batches, WAL + synchronous=FULL, one commit per batch."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(HUB_SCHEMA)
    now = "2026-11-27T00:00:00.000Z"
    t0 = time.perf_counter()
    for first, _, bodies in batches_:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events(store_id, seq, event_id, body, received_at) VALUES (?,?,?,?,?)",
                         [(STORE, first + i, str(first + i), b, now) for i, b in enumerate(bodies)])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def drain(hub_dir: Path, db: Path, config: Path, api_port: int, mqtt_port: int, central: list[str],
          args, procs: list[subprocess.Popen], broker: subprocess.Popen) -> dict:
    """One end-to-end round into a hub on an empty database, with the kiosk load throughout.

    --start reconnect: the agent starts while its link to the broker is stalled (the broker
    SIGSTOPped, as a dead uplink would look), settles for SETTLE_S, then the kiosk's idle
    window (IDLE_S) is measured on the same warm process; the broker resumes and the drain
    is timed from then until the hub's ack reaches N.
    --start cold: the agent starts with the link up; the drain is timed from the agent
    being ready (its start-up and first kiosk requests fall in the drain window).
    """
    hub_db = hub_dir / "hub.db"
    hub_dir.mkdir(parents=True, exist_ok=True)
    (hub_dir / "hub.toml").write_text(
        f'[[stores]]\nid = "{STORE}"\n[storage]\npath = "{hub_db}"\nsynchronous = "FULL"\n'
        f'[mqtt]\nport = {mqtt_port}\n[log]\nformat = "text"\n')
    hub = subprocess.Popen([*central, str(BIN / "edge-hub"), "run", "--config", str(hub_dir / "hub.toml")],
                           stdout=open(hub_dir / "hub.out", "ab"), stderr=subprocess.STDOUT)
    procs.append(hub)
    deadline = time.monotonic() + 20
    while "connected to" not in (hub_dir / "hub.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch = AckWatch(mqtt_port, args.events)
    write_agent_config(config, db, api_port, mqtt_port, sync=True, batch=args.batch, inflight=args.inflight)
    kiosk = Kiosk(api_port)
    reconnect = args.start == "reconnect"
    if reconnect:
        broker.send_signal(signal.SIGSTOP)
    t0 = time.perf_counter()
    try:
        agent = start_agent(config, api_port, config.parent / "agent.out")
    except BaseException:
        broker.send_signal(signal.SIGCONT)
        raise
    procs.append(agent)
    t_ready = time.perf_counter()
    kiosk.start()
    t_idle = t_ready
    if reconnect:
        time.sleep(SETTLE_S)
        t_idle = time.perf_counter()
        time.sleep(IDLE_S)
        t_ready = time.perf_counter()
        broker.send_signal(signal.SIGCONT)
    if not watch.done.wait(600):
        raise RuntimeError(f"the hub's ack stopped at {watch.acked}")
    t_end = time.perf_counter()
    samples = kiosk.stop()
    watch.close()
    stop(agent)
    stop(hub)
    procs.clear()
    held = sqlite3.connect(hub_db).execute(
        "SELECT COUNT(*), COUNT(DISTINCT seq), MAX(seq) FROM events WHERE store_id = ?", (STORE,)).fetchone()
    idle, drained = window(samples, t_idle, t_ready), window(samples, t_ready, t_end)
    return {"e2e_seconds": round(t_end - t_ready, 3), "e2e_events_per_s": round(args.events / (t_end - t_ready)),
            "agent_start_seconds": round(t_ready - t0, 3) if not reconnect else None,
            "hub_holds": list(held),
            "kiosk_idle": latency_stats(idle) if reconnect else None,
            "kiosk_drain": latency_stats(drained), "idle_latencies": idle if reconnect else [],
            "latencies": drained}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="drain the backlog this many times (each into a new hub); the kiosk's"
                             " drain latencies are pooled, the end-to-end rate is the median")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--hub-cpu", choices=("spare", "shared"), default="spare",
                        help="spare (default): edge-hub and mosquitto run under SCHED_IDLE, so they"
                             " take only CPU the store's side leaves idle, as on the central machines"
                             " they run on in a deployment; shared: at normal priority, competing with"
                             " the agent and the kiosk for this machine's cores")
    parser.add_argument("--hub-nice", type=int, default=0,
                        help="with --hub-cpu shared: run edge-hub and mosquitto at this nice level")
    parser.add_argument("--start", choices=("reconnect", "cold"), default="reconnect",
                        help="reconnect (default): each round's agent starts with its broker link"
                             " stalled, the kiosk's idle window is measured on it, then the link"
                             " comes back and the backlog drains; cold: the agent starts with the"
                             " link up and drains from start-up, idle measured on a separate"
                             " agent started with sync off")
    parser.add_argument("--agent-cpu", choices=("unit", "other"), default="unit",
                        help="unit (default): the agent's main thread (the event loop) under"
                             " SCHED_RR 1 with reset-on-fork, as systemd/edge-agent.service starts"
                             " it (CPUSchedulingPolicy=rr); other: plain SCHED_OTHER")
    parser.add_argument("--kiosk-cpu", choices=("device", "shared"), default="device",
                        help="device (default): the kiosk client under SCHED_FIFO 1, standing for a"
                             " kiosk's own device, so that its own wait for a core of this machine"
                             " is not timed; shared: at normal priority")
    args = parser.parse_args()
    if args.agent_cpu == "unit" or args.kiosk_cpu == "device":
        if subprocess.run(["chrt", "--rr", "1", "true"], capture_output=True).returncode != 0:
            parser.error("--agent-cpu unit and --kiosk-cpu device need real-time scheduling (run as"
                         " root, or with CAP_SYS_NICE); or pass --agent-cpu other --kiosk-cpu shared")
    AGENT_LAUNCHER[:] = UNIT_LAUNCHER if args.agent_cpu == "unit" else []
    Kiosk.realtime = args.kiosk_cpu == "device"
    central = (["chrt", "--idle", "0"] if args.hub_cpu == "spare"
               else ["nice", "-n", str(args.hub_nice)] if args.hub_nice else [])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    mqtt_port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 64\n"
        # Without it mosquitto holds each small packet to a client (the hub's ack, a PUBACK)
        # behind Nagle's algorithm for up to the peer's 40 ms delayed ACK (docs/protocol.md).
        "set_tcp_nodelay true\n")
    broker = subprocess.Popen([*central, mosquitto, "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen] = []
    result: dict = {"events": args.events, "batch_max_events": args.batch, "max_inflight": args.inflight,
                    "hub_cpu": args.hub_cpu, "agent_cpu": args.agent_cpu, "kiosk_cpu": args.kiosk_cpu,
                    "start": args.start}
    try:
        wait_port(mqtt_port)
        db = work / "agent" / "events.db"
        print(f"building a log of {args.events} events in {db} ...", flush=True)
        asyncio.run(build_log(db, STORE, args.events, 5000))
        fresh = work / "agent" / "events.fresh.db"
        shutil.copyfile(db, fresh)  # build_log ends with the WAL truncated: the file is the whole log
        plan = batches(db, args.batch, 256 * 1024)
        payloads = [protocol.encode_batch(STORE, f, l, b) for f, l, b in plan]
        result["batches"] = len(plan)
        result["payload_bytes"] = sum(map(len, payloads))

        api_port = free_port()
        config = work / "agent.toml"
        if args.start == "cold":
            write_agent_config(config, db, api_port, mqtt_port, sync=False, batch=args.batch,
                               inflight=args.inflight)
            agent = start_agent(config, api_port, work / "agent.out")
            kiosk = Kiosk(api_port).start()
            time.sleep(5)
            result["kiosk_idle"] = latency_stats([lat for _, lat in kiosk.stop()])
            stop(agent)

        # Each round drains the same backlog into a new hub: the agent's log is restored to
        # its state as built (cursor 0), the hub starts on an empty database.
        drain_lat: list[float] = []
        idle_lat: list[float] = []
        result["rounds"] = []
        for r in range(args.rounds):
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(fresh, db)
            clear_retained(mqtt_port, protocol.ack_topic("retail", STORE))
            one = drain(work / f"hub{r}", db, config, api_port, mqtt_port, central, args, procs, broker)
            drain_lat += one.pop("latencies")
            idle_lat += one.pop("idle_latencies")
            result["rounds"].append(one)
        e2e = sorted(one["e2e_events_per_s"] for one in result["rounds"])
        result["e2e_events_per_s"] = e2e[len(e2e) // 2]
        if args.start == "reconnect":
            result["kiosk_idle"] = latency_stats(idle_lat)
        result["kiosk_drain"] = latency_stats(drain_lat)
        held = tuple(one["hub_holds"] for one in result["rounds"])

        mqtt_s = raw_mqtt(mqtt_port, payloads, args.inflight)
        result["raw_mqtt_events_per_s"] = round(args.events / mqtt_s)
        sql_s = raw_sqlite(work / "raw.db", plan)
        result["raw_sqlite_events_per_s"] = round(args.events / sql_s)
        slower = min(result["raw_mqtt_events_per_s"], result["raw_sqlite_events_per_s"])
        result["e2e_vs_slower_raw"] = round(result["e2e_events_per_s"] / slower, 3)
        result["kiosk_p99_ratio"] = round(result["kiosk_drain"]["p99_ms"] / result["kiosk_idle"]["p99_ms"], 3)
        result["targets"] = {
            "e2e >= 20000/s": result["e2e_events_per_s"] >= 20_000,
            "e2e >= 0.5x slower raw": result["e2e_vs_slower_raw"] >= 0.5,
            "kiosk p99 < 2x idle": result["kiosk_p99_ratio"] < 2,
            "hub holds 1..N once": all(h == [args.events] * 3 for h in held),
        }
        print(json.dumps(result, indent=2))
        return 0 if all(result["targets"].values()) else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        broker.kill()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
