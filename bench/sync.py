"""Benchmark: drain a backlog from the agent's log into the hub, against the raw stages.

    .venv/bin/python bench/sync.py [--events 200000] [--batch 500] [--rounds 3] [--tree PATH]
                                   [--ab PATH] [--idle-cpu-s 30] [--idle-poll 0.05] [--workdir DIR]

Every process runs at normal priority, with no real-time class anywhere:
- the store's side is `edge-agent run --config F` started as systemd/edge-agent.service
  starts it (same command line, MALLOC_ARENA_MAX=2 as the unit's Environment=, no
  CPUScheduling*); it starts its sync process itself, `sync.nice` steps nicer;
- the kiosk client runs in a process of its own at nice 0, so its own wait for one of this
  machine's cores is part of what it times;
- the hub (`edge-hub run`, this tree's) and the broker stand for the central side and run
  under `nice -n 19`.

Steps, all in one run, on one private mosquitto on a free loopback port:
1. Build an agent log of N events with each measured tree's own code (not timed).
2. --rounds times (default 3) for each tree, alternating A and B when --ab is given: a new
   `edge-hub run` (synchronous=FULL) on an empty database; `edge-agent run` with sync on
   and the agent's files restored to the built log (no sync.db, cursor 0), started while
   the broker is SIGSTOPped (a stalled uplink); after SETTLE_S the kiosk's idle window
   (IDLE_S of GET /v1/availability/{sku} at 100/s); then the broker resumes and the drain
   is timed until the hub's retained ack reaches N, the kiosk load running throughout.
   The rate is the median round's; the kiosk's latencies are pooled over the rounds.
3. After each round (each A/B pair): raw MQTT, plain paho publishing the same payload bytes
   at QoS 1 to the same broker (same in-flight window) until every PUBACK is in; raw
   SQLite, plain sqlite3 inserting the same rows in the same batches into the hub's table
   layout (WAL, synchronous=FULL, one commit per batch). Their medians are the raw figures.
4. Idle cost (--idle-cpu-s, 0 to skip): in each tree's last round, once the backlog is
   acked, the CPU seconds (utime + stime, /proc/PID/stat) the sync process and the agent
   use over that many seconds with nothing to send; then again for each --idle-poll value
   of `sync.poll_interval_s` (trees that have the key), the agent restarted with it.
Prints a JSON summary and the verdict against the targets; each round records the
scheduling of every process and any test run or bench that ran beside it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import shutil
import signal
import sqlite3
import statistics
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

from bench.common import (Overlap, Tree, bench_lock, children, cpu_seconds, free_port,  # noqa: E402
                          scheduling, wait_port, wait_quiet)
from agent.reader import LogReader  # noqa: E402
from sync import protocol  # noqa: E402
from sync.hub.store import SCHEMA_SQL as HUB_SCHEMA  # noqa: E402

STORE = "store-0042"
SKUS = 5000
SETTLE_S = 1.0     # after the agent is ready, before the idle window
IDLE_S = 3.0       # the kiosk's idle window, the link still stalled
IDLE_SETTLE_S = 3.0  # before an idle-cost window: the restarted sync connects and reads the ack
STALL_S = 60.0     # no ack progress this long: the round fails
BIN = Path(sys.executable).parent
CENTRAL = ["nice", "-n", "19"]   # the hub and the broker: the central side


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


def _kiosk_requests(port: int, rate: float, go, stop, out) -> None:
    """The kiosk's loop, in its own process: from `go` until `stop`, GET at a steady rate;
    send (start, latency) of each request, start on the machine's monotonic clock."""
    import os

    out.send(os.getpid())
    go.wait()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples, i, next_at = [], 0, time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", f"/v1/availability/SKU-{i % SKUS}")
        conn.getresponse().read()
        samples.append((t0, time.perf_counter() - t0))
        i += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
    conn.close()
    out.send(samples)


class Kiosk:
    """GET /v1/availability/{sku} at a steady rate; records latencies.

    The client runs in a process of its own at normal priority, as a kiosk's browser would:
    in this one it would share the interpreter lock with the ack watcher's MQTT thread.
    """

    def __init__(self, port: int, rate: float = 100.0):
        ctx = multiprocessing.get_context("spawn")
        self._go, self._stop = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_kiosk_requests, daemon=True,
                                 args=(port, rate, self._go, self._stop, send))
        self._proc.start()
        self.pid = self._recv.recv()

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


def write_agent_config(path: Path, db: Path, api_port: int, mqtt_port: int, batch: int, inflight: int,
                       poll_s: float | None = None) -> None:
    poll = f"poll_interval_s = {poll_s}\n" if poll_s is not None else ""
    path.write_text(
        f'[store]\nid = "{STORE}"\n[storage]\npath = "{db}"\n[api]\nport = {api_port}\n'
        f'[mqtt]\nport = {mqtt_port}\nreconnect_min_s = 0.1\n'
        f'[sync]\nenabled = true\nbatch_max_events = {batch}\nmax_inflight = {inflight}\n{poll}'
        '[service]\nbackup_interval_s = 0\n[log]\nformat = "text"\n')


def start_agent(tree: Tree, config: Path, api_port: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(tree.agent_argv(config), env=tree.env(), cwd="/", stdout=open(out, "ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"edge-agent exited with {proc.returncode}; see {out}")
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

    def wait(self, name: str, stall_s: float) -> None:
        """Return once the ack reaches the target; raise when it makes no progress for `stall_s`."""
        seen, since = -1, time.monotonic()
        while not self.done.wait(0.05):
            if self.acked != seen:
                seen, since = self.acked, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise RuntimeError(f"{name}: the hub's ack stopped at {self.acked} of {self.target}"
                                   f" for {stall_s:.0f} s (see the agent's output)")

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
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
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


def idle_cost(agent: subprocess.Popen, seconds: float) -> dict:
    """CPU seconds the agent and its sync process use over `seconds` with nothing to do."""
    sync = children(agent.pid)
    pids = {"agent": [agent.pid], "sync": sync}
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    overlap = Overlap()
    time.sleep(seconds)
    seen = overlap.stop()
    after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    if children(agent.pid) != sync:
        raise RuntimeError(f"the agent's sync process changed during the idle window: {sync} -> "
                           f"{children(agent.pid)}")
    used = {k: round(after[k] - before[k], 2) for k in pids}
    return {"seconds": seconds, "sync_cpu_s": used["sync"], "agent_cpu_s": used["agent"],
            "sync_core_pct": round(100 * used["sync"] / seconds, 2), "others_running": seen}


class Side:
    """One measured tree: its built log, its agent's files, and its rounds."""

    def __init__(self, name: str, tree: Tree, work: Path):
        self.name, self.tree = name, tree
        self.dir = work / name
        self.fresh = self.dir / "events.fresh.db"
        self.agent_dir = self.dir / "agent"
        self.db = self.agent_dir / "events.db"
        self.config = self.dir / "agent.toml"
        self.rounds: list[dict] = []
        self.idle_lat: list[float] = []
        self.drain_lat: list[float] = []
        self.idle_cost: dict[str, dict] = {}
        self.has_poll_key = "poll_interval_s" in (tree.root / "agent" / "settings.py").read_text()

    def build(self, events: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.fresh.exists():
            print(f"{self.name}: building a log of {events} events with {self.tree.root}'s code ...", flush=True)
            self.tree.build_log(self.fresh, STORE, events, SKUS)

    def restore(self) -> None:
        """The agent's files as built: the log alone (no sync.db, snapshot or cursor: cursor 0)."""
        shutil.rmtree(self.agent_dir, ignore_errors=True)
        self.agent_dir.mkdir(parents=True)
        shutil.copyfile(self.fresh, self.db)  # built with the WAL truncated: the file is the whole log


def drain(side: Side, r: int, mqtt_port: int, args, procs: list[subprocess.Popen],
          broker: subprocess.Popen, idle_polls: list[float] | None) -> dict:
    """One round into a hub on an empty database, with the kiosk load throughout.

    The agent starts while its link to the broker is stalled (the broker SIGSTOPped, as a
    dead uplink would look), settles for SETTLE_S, then the kiosk's idle window (IDLE_S) is
    measured on the same warm process; the broker resumes and the drain is timed from then
    until the hub's ack reaches N. With `idle_polls` (a list, maybe empty), the idle cost is
    measured afterwards, at the configured poll interval and then at each of those.
    """
    side.restore()
    clear_retained(mqtt_port, protocol.ack_topic("retail", STORE))
    hub_dir = side.dir / f"hub{r}"
    hub_db = hub_dir / "hub.db"
    shutil.rmtree(hub_dir, ignore_errors=True)
    hub_dir.mkdir(parents=True)
    (hub_dir / "hub.toml").write_text(
        f'[[stores]]\nid = "{STORE}"\n[storage]\npath = "{hub_db}"\nsynchronous = "FULL"\n'
        f'[mqtt]\nport = {mqtt_port}\n[log]\nformat = "text"\n')
    hub = subprocess.Popen([*CENTRAL, str(BIN / "edge-hub"), "run", "--config", str(hub_dir / "hub.toml")],
                           stdout=open(hub_dir / "hub.out", "ab"), stderr=subprocess.STDOUT)
    procs.append(hub)
    deadline = time.monotonic() + 20
    while "connected to" not in (hub_dir / "hub.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch = AckWatch(mqtt_port, args.events)
    api_port = free_port()
    write_agent_config(side.config, side.db, api_port, mqtt_port, args.batch, args.inflight)
    kiosk = Kiosk(api_port)
    waited = wait_quiet(args.wait_quiet)
    overlap = Overlap()
    broker.send_signal(signal.SIGSTOP)
    try:
        agent = start_agent(side.tree, side.config, api_port, side.dir / "agent.out")
    except BaseException:
        broker.send_signal(signal.SIGCONT)
        raise
    procs.append(agent)
    kiosk.start()
    time.sleep(SETTLE_S)
    t_idle = time.perf_counter()
    time.sleep(IDLE_S)
    t_ready = time.perf_counter()
    broker.send_signal(signal.SIGCONT)
    sched = {"agent": scheduling(agent.pid), "sync": [scheduling(p) for p in children(agent.pid)],
             "kiosk": scheduling(kiosk.pid), "hub": scheduling(hub.pid), "broker": scheduling(broker.pid)}
    watch.wait(side.name, STALL_S)
    t_end = time.perf_counter()
    samples = kiosk.stop()
    seen = overlap.stop()
    watch.close()
    if idle_polls is not None:
        time.sleep(IDLE_SETTLE_S)
        side.idle_cost["default"] = idle_cost(agent, args.idle_cpu_s)
        for poll in idle_polls:
            stop(agent)
            procs.remove(agent)
            write_agent_config(side.config, side.db, api_port, mqtt_port, args.batch, args.inflight, poll_s=poll)
            agent = start_agent(side.tree, side.config, api_port, side.dir / "agent.out")
            procs.append(agent)
            time.sleep(IDLE_SETTLE_S)
            side.idle_cost[f"poll_interval_s={poll}"] = idle_cost(agent, args.idle_cpu_s)
    stop(agent)
    stop(hub)
    procs.clear()
    held = sqlite3.connect(hub_db).execute(
        "SELECT COUNT(*), COUNT(DISTINCT seq), MAX(seq) FROM events WHERE store_id = ?", (STORE,)).fetchone()
    idle, drained = window(samples, t_idle, t_ready), window(samples, t_ready, t_end)
    side.idle_lat += idle
    side.drain_lat += drained
    drain_stats = latency_stats(drained)
    return {"round": r, "e2e_seconds": round(t_end - t_ready, 3),
            "e2e_events_per_s": round(args.events / (t_end - t_ready)), "hub_holds": list(held),
            "kiosk_idle_p99_ms": latency_stats(idle)["p99_ms"], "kiosk_drain_p99_ms": drain_stats["p99_ms"],
            "kiosk_drain_requests": drain_stats["requests"], "scheduling": sched,
            "waited_for_quiet_s": waited, "others_running": seen}


def summary(side: Side, events: int) -> dict:
    e2e = [one["e2e_events_per_s"] for one in side.rounds]
    idle, drained = latency_stats(side.idle_lat), latency_stats(side.drain_lat)
    return {"tree": str(side.tree.root), "commit": side.tree.label(),
            "command": " ".join(side.tree.agent_argv(side.config)),
            "e2e_events_per_s": round(statistics.median(e2e)), "e2e_rounds": e2e,
            "kiosk_idle": idle, "kiosk_drain": drained,
            "kiosk_drain_vs_idle_p99": round(drained["p99_ms"] / idle["p99_ms"], 3),
            "hub_holds_1_to_n_once": all(one["hub_holds"] == [events] * 3 for one in side.rounds),
            "idle_cost": side.idle_cost, "rounds": side.rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="drain the backlog this many times per tree (each into a new hub); the kiosk's"
                             " latencies are pooled, the end-to-end rate is the median round's")
    parser.add_argument("--tree", default=str(ROOT),
                        help="the source tree whose edge-agent is measured (A), with its own .venv"
                             " (default: this one)")
    parser.add_argument("--ab", metavar="PATH",
                        help="also measure the tree at PATH (B, e.g. a worktree of main with its own"
                             " `uv sync --frozen`), its rounds alternating with A's; targets compare A to B")
    parser.add_argument("--idle-cpu-s", type=float, default=30,
                        help="in each tree's last round, after the drain: the sync process's CPU over"
                             " this many idle seconds (0: skip)")
    parser.add_argument("--idle-poll", type=float, action="append", default=[],
                        help="also measure the idle cost with sync.poll_interval_s at this value"
                             " (repeatable; trees that have the key)")
    parser.add_argument("--wait-quiet", type=float, default=120,
                        help="before each round, wait up to this many seconds for no pytest or other"
                             " bench on the machine (what ran anyway is recorded per round)")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    trees = {"A": Tree(Path(args.tree).resolve())}
    if args.ab:
        trees["B"] = Tree(Path(args.ab).resolve())
    for tree in trees.values():
        tree.check()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sync-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sides = [Side(name, tree, work) for name, tree in trees.items()]
    with bench_lock():
        return run(args, sides, work)


def run(args, sides: list[Side], work: Path) -> int:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    mqtt_port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 64\n"
        # Without it mosquitto holds each small packet to a client (the hub's ack, a PUBACK)
        # behind Nagle's algorithm for up to the peer's 40 ms delayed ACK (docs/protocol.md).
        "set_tcp_nodelay true\n")
    broker = subprocess.Popen([*CENTRAL, mosquitto, "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen] = []
    result: dict = {"events": args.events, "batch_max_events": args.batch, "max_inflight": args.inflight,
                    "rounds_per_tree": args.rounds, "central": " ".join(CENTRAL)}
    try:
        wait_port(mqtt_port)
        for side in sides:
            side.build(args.events)
        plan = batches(sides[0].fresh, args.batch, 256 * 1024)
        payloads = [protocol.encode_batch(STORE, f, l, b) for f, l, b in plan]
        result["batches"] = len(plan)
        result["payload_bytes"] = sum(map(len, payloads))
        raw_m, raw_s = [], []
        for r in range(args.rounds):
            last = r == args.rounds - 1
            for side in sides:
                polls = None
                if last and args.idle_cpu_s > 0:
                    polls = args.idle_poll if side.has_poll_key else []
                print(f"{side.name} round {r + 1}/{args.rounds} ...", flush=True)
                side.rounds.append(drain(side, r, mqtt_port, args, procs, broker, polls))
            raw_m.append(args.events / raw_mqtt(mqtt_port, payloads, args.inflight))
            raw_s.append(args.events / raw_sqlite(work / "raw.db", plan))
        result["raw_mqtt_events_per_s"] = round(statistics.median(raw_m))
        result["raw_sqlite_events_per_s"] = round(statistics.median(raw_s))
        result["raw_rounds"] = {"mqtt": [round(x) for x in raw_m], "sqlite": [round(x) for x in raw_s]}
        slower = min(result["raw_mqtt_events_per_s"], result["raw_sqlite_events_per_s"])
        for side in sides:
            result[side.name] = summary(side, args.events)
            result[side.name]["e2e_vs_slower_raw"] = round(result[side.name]["e2e_events_per_s"] / slower, 3)
        a = result["A"]
        targets = {
            "A: kiosk p99 during the drain < 5 ms": a["kiosk_drain"]["p99_ms"] < 5,
            "A: end to end >= 0.5x the slower raw stage": a["e2e_vs_slower_raw"] >= 0.5,
            "A: hub holds 1..N once, every round": a["hub_holds_1_to_n_once"],
        }
        if len(sides) > 1:
            b = result["B"]
            result["pairs"] = [
                {"round": ra["round"], "e2e_events_per_s": [ra["e2e_events_per_s"], rb["e2e_events_per_s"]],
                 "kiosk_drain_p99_ms": [ra["kiosk_drain_p99_ms"], rb["kiosk_drain_p99_ms"]]}
                for ra, rb in zip(a["rounds"], b["rounds"])]
            result["A_vs_B"] = {"kiosk_drain_p99": round(a["kiosk_drain"]["p99_ms"] / b["kiosk_drain"]["p99_ms"], 3),
                                "e2e": round(a["e2e_events_per_s"] / b["e2e_events_per_s"], 3)}
            targets["A: kiosk p99 during the drain <= 1.1x B's"] = result["A_vs_B"]["kiosk_drain_p99"] <= 1.1
            targets["A: end to end >= 0.9x B's"] = result["A_vs_B"]["e2e"] >= 0.9
            targets["B: hub holds 1..N once, every round"] = b["hub_holds_1_to_n_once"]
        result["targets"] = targets
        print(json.dumps(result, indent=2))
        return 0 if all(targets.values()) else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        broker.send_signal(signal.SIGCONT)
        broker.kill()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
