"""Benchmark: a fleet of simulated stores against the hub, and against the raw stack.

    .venv/bin/python bench/fleet.py [--stores 500] [--workers 1,2,4] [--rate 0.5] [--store-inflight N] [--quick]
                                    [--write-docs] [--workdir DIR]

Each simulated store is the project's own sync code with a log of its own: an events.db
written by the agent's log (agent/log.py SqliteEventLog), a sync.db (sync/state.py), the
read-only feed (sync/feed.py), the MQTT client (sync/mqtt.py) and the uplink
(sync/uplink.py). Stores run in a few simulator processes (one asyncio loop each, about
STORES_PER_SIM (40) stores, one paho thread and one log writer thread per store) at normal
priority; their files live on /dev/shm (the stores' disks are not what is measured). An
append wakes the store's uplink at once (`poll_interval_s` is set to 1 s, so 500 stores
do not poll their logs every 5 ms): ack latency is append -> hub's ack at the store, with
no polling delay in it.

The central side runs under `nice -n 19`: one private mosquitto and the hub as real
`edge-hub run` processes (one per worker; on PostgreSQL with `hub.workers_shared`).
Hub configurations measured: SQLite with 1 worker (the reference), and PostgreSQL with
each --workers count when this tree's hub has PostgreSQL storage (sync/hub/pg.py) and,
for more than one, shared-subscription workers (`hub.workers_shared`).

Phases, per hub configuration, all stores built fresh:
1. burst: every store starts with BURST events in its log and connects; the ingest rate
   is every event over the time until the last store's ack covers its log.
2. idle: every store appends `--rate` events/s (one event per append, jittered); after a
   warm-up, OUTAGE_SHARE of the stores disconnect and get a backlog of
   rate x `--outage-s` events (an hour at the simulated rate by default) appended while
   offline; then the idle window: ack latency of the other stores (the steady ones).
3. drain: the outage stores reconnect; the drain is timed until each one's ack covers its
   log; the steady stores' ack latency over that time is compared with their idle p99.
The raw stack, in the same run, after each configuration: plain batched inserts of the
burst's rows (same batches) into the same engine: PostgreSQL `COPY` into an events
table keyed (store_id, seq), one transaction per batch; SQLite executemany in the hub's
table layout, WAL, synchronous=FULL, one commit per batch.
Profile: CPU seconds (utime+stime from /proc) of the simulators, the broker, the hub
workers and PostgreSQL's backends over each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, free_port, others_running, wait_port  # noqa: E402

BIN = Path(sys.executable).parent
CENTRAL = ["nice", "-n", "19"]
# paho's network loop uses select(), which cannot watch a descriptor above 1023, and a store
# holds about 23 (its log's writer and reader, the feed, sync.db, each with WAL and shm;
# the socket and paho's socket pair): so at most 40 stores per simulator process.
STORES_PER_SIM = 40
BURST = 200            # events per store in the burst phase
OUTAGE_SHARE = 0.1     # 50 of 500 stores go offline
WARM_S = 3.0
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATE_RATIO = 0.5
TARGET_P99_RATIO = 2.0


def store_id(i: int) -> str:
    return f"store-{i:04d}"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ============================================================ the simulator (child process)

class SimStore:
    """One store: its log, sync.db, feed, MQTT client and uplink, as `edge-agent sync` composes them."""

    def __init__(self, sim: "Sim", sid: str, base: Path):
        self.sim, self.sid, self.dir = sim, sid, base / sid
        self.log = self.state = self.feed = self.mqtt = self.uplink = self.config = None
        self.pending: list[tuple[int, float]] = []   # (last_seq of an append, monotonic time)
        self.appender: asyncio.Task | None = None
        self.steady = True
        self.start = 0         # the ack when the wait began
        self.goal = 0          # the seq the store waits to see acked (burst / drain)
        self.reached = asyncio.Event()
        self.reached_at = 0.0

    async def build(self, events: int) -> None:
        from agent.log import SqliteEventLog
        from agent.settings import AgentConfig
        from sync.state import SqliteSyncState
        import msgspec
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = msgspec.convert({
            "store": {"id": self.sid}, "storage": {"path": str(self.dir / "events.db")},
            "mqtt": {"port": self.sim.port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
            "sync": {"poll_interval_s": 1.0, "ack_timeout_s": 10, "heartbeat_s": 2.0,
                     **({"max_inflight": int(os.environ["FLEET_STORE_INFLIGHT"])}
                        if os.environ.get("FLEET_STORE_INFLIGHT") else {})}},
            AgentConfig)
        self.log = await SqliteEventLog.open(self.dir / "events.db", self.sid, synchronous="NORMAL")
        await self.bulk(events)
        self.state = await SqliteSyncState.open(self.dir / "events.sync.db", self.sid)

    async def bulk(self, n: int) -> None:
        from agent import events as ev
        done = 0
        while done < n:
            size = min(1000, n - done)
            intents = [ev.Receive(sku=f"SKU-{(done + i) % 500}", qty=1 + i % 9) for i in range(size)]
            await self.log.append(ev.AppendCommand(command_id=str(uuid.uuid4()), events=intents))
            done += size

    async def connect(self) -> None:
        from sync.feed import SqliteLogFeed
        from sync.uplink import Uplink, agent_mqtt
        if self.feed is None:
            self.feed = SqliteLogFeed(self.dir / "events.db")
        self.mqtt = agent_mqtt(self.config)
        store = self

        class Measured(Uplink):
            async def on_ack(self, message) -> None:
                await super().on_ack(message)   # the cursor is committed when this returns
                store.acked()

        self.uplink = await Measured.open(self.config, self.feed, self.state, self.mqtt)
        await self.mqtt.start()
        self.task = asyncio.get_running_loop().create_task(self.uplink.run())

    async def disconnect(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.mqtt.stop()

    def acked(self) -> None:
        acked, now = self.uplink.acked_seq, time.monotonic()
        keep = 0
        for seq, at in self.pending:
            if seq > acked:
                break
            self.sim.record(self, now - at)
            keep += 1
        del self.pending[:keep]
        if self.goal and acked >= self.goal and not self.reached.is_set():
            self.reached_at = now
            self.reached.set()

    async def append_loop(self, rate: float) -> None:
        from agent import events as ev
        await asyncio.sleep(random.random() / rate)
        next_at = time.monotonic()
        i = 0
        while True:
            t0 = time.monotonic()
            res = await self.log.append(ev.AppendCommand(
                command_id=str(uuid.uuid4()), events=[ev.Receive(sku=f"SKU-{i % 500}", qty=1)]))
            if self.uplink is not None and self.mqtt.connected and self.steady:
                self.pending.append((res.last_seq, t0))
                self.uplink._wake.set()   # the log grew: look now, not at the next poll
            i += 1
            next_at += random.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def close(self) -> None:
        if self.appender:
            self.appender.cancel()
            await asyncio.gather(self.appender, return_exceptions=True)
        if self.uplink is not None and not self.task.done():
            await self.disconnect()
        if self.feed:
            self.feed.close()
        await self.state.close()
        await self.log.close()


class Sim:
    def __init__(self, port: int, ids: list[str], base: Path):
        self.port, self.base = port, base
        self.stores = [SimStore(self, sid, base) for sid in ids]
        self.samples: dict[str, list[float]] = {}
        self.phase = "none"

    def record(self, store: SimStore, latency: float) -> None:
        if store.steady:
            self.samples.setdefault(self.phase, []).append(latency)

    async def until_reached(self, stores: list[SimStore], t0: float, limit_s: float) -> dict:
        """Wait until every store's ack reaches its goal, or `limit_s`; say how far they got."""
        try:
            await asyncio.wait_for(asyncio.gather(*(s.reached.wait() for s in stores)), limit_s)
        except TimeoutError:
            pass
        done = [s for s in stores if s.reached.is_set()]
        return {"t0": t0, "last": max((s.reached_at for s in done), default=t0) if len(done) == len(stores)
                else time.monotonic(), "stores": len(stores), "reached": len(done),
                "events": sum(s.uplink.acked_seq - s.start for s in stores)}

    async def command(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "build":
            for s in self.stores:   # one at a time: the log's open waits on a thread of the default executor
                await s.build(cmd["events"])
            return {"built": len(self.stores)}
        if op == "burst":
            for s in self.stores:
                s.goal, s.start = s.log.last_seq, 0
            t0 = time.monotonic()
            for s in self.stores:
                await s.connect()
            return await self.until_reached(self.stores, t0, cmd["limit_s"])
        if op == "steady":
            self.phase = "warm"
            for s in self.stores:
                s.goal = 0
                s.appender = asyncio.get_running_loop().create_task(s.append_loop(cmd["rate"]))
            return {}
        if op == "outage":
            out = [s for s in self.stores if s.sid in set(cmd["ids"])]
            for s in out:
                s.steady = False
                s.appender.cancel()
                await asyncio.gather(s.appender, return_exceptions=True)
                s.pending.clear()
            await asyncio.gather(*(s.disconnect() for s in out))
            await asyncio.gather(*(s.bulk(cmd["backlog"]) for s in out))
            return {"offline": len(out), "backlog": sum(s.log.last_seq - s.uplink.acked_seq for s in out)}
        if op == "phase":
            self.phase = cmd["name"]
            return {}
        if op == "drain":
            self.phase = "drain"
            out = [s for s in self.stores if not s.steady]
            t0 = time.monotonic()
            for s in out:
                s.goal, s.reached, s.start = s.log.last_seq, asyncio.Event(), s.uplink.acked_seq
                await s.connect()
            return await self.until_reached(out, t0, cmd["limit_s"])
        if op == "samples":
            return {"samples": self.samples, "pid": os.getpid()}
        if op == "stop":
            await asyncio.gather(*(s.close() for s in self.stores), return_exceptions=True)
            return {}
        raise ValueError(op)


async def sim_main(port: int, ids: list[str], base: Path) -> None:
    raise_nofile()
    sim = Sim(port, ids, base)
    loop = asyncio.get_running_loop()
    # Every store's log reads and sync.db writes go through asyncio.to_thread: one pool for
    # the process's stores, sized for them (the default is cores + 4).
    from concurrent.futures import ThreadPoolExecutor
    loop.set_default_executor(ThreadPoolExecutor(max_workers=min(64, 4 + len(ids))))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        try:
            reply = await asyncio.wait_for(sim.command(cmd), cmd.get("timeout", 600))
        except Exception as exc:   # reported to the coordinator, which fails the run
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["op"] == "stop":
            return


# ============================================================ the coordinator

class SimProc:
    def __init__(self, port: int, ids: list[str], base: Path, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--sim", str(port), str(base), ",".join(ids)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(out, "ab"), cwd="/",
            env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"})

    def send(self, **cmd) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator {self.proc.pid} exited ({self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"simulator {self.proc.pid}: {reply['error']}")
        return reply


def all_do(sims: list[SimProc], **cmd) -> list[dict]:
    for s in sims:
        s.send(**cmd)
    return [s.recv() for s in sims]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(len(xs) * q))], 1)


def lat(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 0.5), "p99_ms": pct(xs, 0.99)}


def pg_available() -> bool:
    return (ROOT / "sync" / "hub" / "pg.py").exists()


def workers_available() -> bool:
    return "workers_shared" in (ROOT / "sync" / "hub" / "settings.py").read_text()


def pg_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


class Cpu:
    """CPU seconds of groups of processes between two readings."""

    def __init__(self, groups: dict[str, callable]):
        self.groups = groups

    def read(self) -> dict[str, float]:
        return {name: sum(self._seconds(p) for p in fn()) for name, fn in self.groups.items()}

    @staticmethod
    def _seconds(pid: int) -> float:
        try:
            return cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):   # a backend that ended since it was listed
            return 0.0

    @staticmethod
    def diff(a: dict, b: dict, seconds: float) -> dict:
        return {k: {"cpu_s": round(b[k] - a[k], 1), "core_pct": round(100 * (b[k] - a[k]) / seconds)} for k in a}


def create_pg_db() -> str:
    import psycopg
    name = f"fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_db(url: str) -> None:
    import psycopg
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def burst_batches(base: Path, ids: list[str]) -> list[tuple[str, int, list[bytes]]]:
    """The burst's rows per store, as the uplink batched them (one batch of <= 500 events)."""
    out = []
    for sid in ids:
        conn = sqlite3.connect(f"file:{base / sid / 'events.db'}?mode=ro", uri=True)
        rows = conn.execute("SELECT seq, body FROM events WHERE seq <= ? ORDER BY seq", (BURST,)).fetchall()
        conn.close()
        for i in range(0, len(rows), 500):
            chunk = rows[i:i + 500]
            out.append((sid, chunk[0][0], [bytes(b) for _, b in chunk]))
    return out


def raw_pg(batches: list) -> float:
    """Plain COPY of the same rows in the same batches into a fresh table; one commit per batch."""
    import psycopg
    url = create_pg_db()
    try:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE events (store_id TEXT NOT NULL, seq BIGINT NOT NULL, body BYTEA NOT NULL,"
                         " received_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (store_id, seq))")
            conn.commit()
            t0 = time.perf_counter()
            for sid, first, bodies in batches:
                with conn.cursor().copy("COPY events (store_id, seq, body) FROM STDIN") as copy:
                    for i, b in enumerate(bodies):
                        copy.write_row((sid, first + i, b))
                conn.commit()
            return time.perf_counter() - t0
    finally:
        drop_pg_db(url)


def raw_sqlite(path: Path, batches: list) -> float:
    from sync.hub.store import SCHEMA_SQL
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA_SQL)
    now = "2026-11-27T00:00:00.000Z"
    t0 = time.perf_counter()
    for sid, first, bodies in batches:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events(store_id, seq, event_id, body, received_at) VALUES (?,?,?,?,?)",
                         [(sid, first + i, f"{sid}-{first + i}", b, now) for i, b in enumerate(bodies)])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


REGION_SIZE = 10


def hub_configs(work: Path, ids: list[str], port: int, engine: str, workers: int, url: str) -> list[Path]:
    # Regions of REGION_SIZE stores, as a chain has: a store's "nearby" are the others of its
    # region (one region of 500 would make every snapshot list 499 stores).
    stores = "".join(f'[[stores]]\nid = "{sid}"\nregion = "region-{i // REGION_SIZE:03d}"\n'
                     for i, sid in enumerate(ids))
    paths = []
    for w in range(workers):
        d = work / f"hub-{w}"
        d.mkdir(parents=True, exist_ok=True)
        storage = (f'[storage]\nurl = "{url}"\n' if engine == "pg"
                   else f'[storage]\npath = "{work / "hub.db"}"\nsynchronous = "FULL"\n')
        hub = f'[hub]\nid = "hub-1"\n'
        if workers > 1:
            hub += f"worker = {w}\nworkers_shared = true\n"
        (d / "hub.toml").write_text(f"{stores}{hub}{storage}[mqtt]\nport = {port}\n[log]\nformat = \"text\"\n")
        paths.append(d / "hub.toml")
    return paths


def run_config(args, engine: str, workers: int, work: Path) -> dict:
    print(f"== {engine}, {workers} worker(s), {args.stores} stores", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    ids = [store_id(i) for i in range(args.stores)]
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 64\nset_tcp_nodelay true\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    procs: list[subprocess.Popen] = []
    sims: list[SimProc] = []
    base = Path(tempfile.mkdtemp(prefix="fleet-", dir="/dev/shm"))
    url = create_pg_db() if engine == "pg" else ""
    result: dict = {"engine": engine, "workers": workers, "stores": args.stores}
    try:
        broker = subprocess.Popen([*CENTRAL, mosquitto, "-c", str(work / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
        procs.append(broker)
        wait_port(port)
        hubs = []
        for cfg in hub_configs(work, ids, port, engine, workers, url):
            out = cfg.parent / "hub.out"
            hubs.append(subprocess.Popen([*CENTRAL, str(BIN / "edge-hub"), "run", "--config", str(cfg)],
                                         stdout=open(out, "ab"), stderr=subprocess.STDOUT, preexec_fn=raise_nofile))
            procs.append(hubs[-1])
            deadline = time.monotonic() + 30
            while "connected to" not in out.read_text():
                if hubs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"edge-hub did not start; see {out}")
                time.sleep(0.05)
        per = max(1, min(STORES_PER_SIM, -(-args.stores // max(1, -(-args.stores // STORES_PER_SIM)))))
        groups = [ids[i:i + per] for i in range(0, len(ids), per)]
        sims = [SimProc(port, g, base, work / f"sim{n}.err") for n, g in enumerate(groups)]
        outage = ids[::round(1 / OUTAGE_SHARE)][:max(1, round(args.stores * OUTAGE_SHARE))]
        backlog = round(args.rate * args.outage_s)
        result.update(outage_stores=len(outage), backlog_per_store=backlog, rate_per_store=args.rate,
                      store_inflight=args.store_inflight,
                      steady_stores=args.stores - len(outage))
        t = time.monotonic()
        all_do(sims, op="build", events=BURST)
        print(f"   built {args.stores} logs of {BURST} events in {time.monotonic() - t:.1f} s", flush=True)
        cpu = Cpu({"simulators": lambda: [s.proc.pid for s in sims], "broker": lambda: [broker.pid],
                   "hub": lambda: [h.pid for h in hubs], "postgresql": pg_pids})

        result["others_running_at_start"] = [o for o in others_running() if "--sim" not in o]
        result["loadavg_at_start"] = os.getloadavg()
        c0, t0 = cpu.read(), time.monotonic()
        replies = all_do(sims, op="burst", limit_s=args.limit_s)
        c1, t1 = cpu.read(), time.monotonic()
        events = sum(r["events"] for r in replies)
        seconds = max(r["last"] for r in replies) - min(r["t0"] for r in replies)
        result["burst"] = {"events": events, "complete": all(r["reached"] == r["stores"] for r in replies), "seconds": round(seconds, 2), "events_per_s": round(events / seconds),
                           "cpu": Cpu.diff(c0, c1, t1 - t0)}
        print(f"   burst: {events} events in {seconds:.2f} s = {events / seconds:.0f}/s", flush=True)

        all_do(sims, op="steady", rate=args.rate)
        time.sleep(WARM_S)
        replies = all_do(sims, op="outage", ids=outage, backlog=backlog, timeout=900)
        result["backlog_events"] = sum(r["backlog"] for r in replies)
        time.sleep(1.0)
        all_do(sims, op="phase", name="idle")
        c0 = cpu.read()
        time.sleep(args.idle_s)
        c1 = cpu.read()
        result["idle_cpu"] = Cpu.diff(c0, c1, args.idle_s)
        c0, t0 = cpu.read(), time.monotonic()
        replies = all_do(sims, op="drain", limit_s=args.limit_s, timeout=args.limit_s + 60)
        c1, t1 = cpu.read(), time.monotonic()
        drain_s = max(r["last"] for r in replies) - min(r["t0"] for r in replies)
        drained = sum(r["events"] for r in replies)
        result["drain"] = {"seconds": round(drain_s, 2), "events": drained, "backlog": result["backlog_events"],
                           "complete": all(r["reached"] == r["stores"] for r in replies),
                           "events_per_s": round(drained / drain_s) if drain_s else None,
                           "cpu": Cpu.diff(c0, c1, t1 - t0)}
        all_do(sims, op="phase", name="after")
        samples: dict[str, list] = {}
        for r in all_do(sims, op="samples"):
            for k, v in r["samples"].items():
                samples.setdefault(k, []).extend(v)
        result["idle_ack"] = lat(samples.get("idle", []))
        result["drain_ack"] = lat(samples.get("drain", []))
        idle99, drain99 = result["idle_ack"]["p99_ms"], result["drain_ack"]["p99_ms"]
        result["drain_p99_ratio"] = round(drain99 / idle99, 2) if idle99 and drain99 else None
        print(f"   idle ack {result['idle_ack']}, drain {drain_s:.1f} s of {result['backlog_events']} events,"
              f" ack during drain {result['drain_ack']}", flush=True)
        all_do(sims, op="stop")
        for s in sims:
            s.proc.wait(30)
        sims = []
        for h in hubs:
            h.send_signal(signal.SIGTERM)
        for h in hubs:
            try:
                h.wait(60)
            except subprocess.TimeoutExpired:   # a niced hub still busy: the raw stage needs the cores
                h.kill()
                h.wait()

        batches = burst_batches(base, ids)
        raw = raw_pg(batches) if engine == "pg" else raw_sqlite(work / "raw.db", batches)
        result["raw"] = {"what": "COPY, one commit per batch" if engine == "pg" else
                         "sqlite3 executemany, WAL, synchronous=FULL, one commit per batch",
                         "events": events, "seconds": round(raw, 2), "events_per_s": round(events / raw)}
        result["rate_ratio"] = round(result["burst"]["events_per_s"] / result["raw"]["events_per_s"], 3)
        print(f"   raw {engine}: {events / raw:.0f}/s; hub/raw = {result['rate_ratio']}", flush=True)
        return result
    finally:
        for s in sims:
            s.proc.kill()
            s.proc.wait()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(base, ignore_errors=True)
        if url:
            drop_pg_db(url)


def verdict(results: list[dict]) -> dict:
    out = {}
    pg4 = [r for r in results if r["engine"] == "pg" and r["workers"] == 4]
    if pg4:
        out["rate_4_workers_vs_copy"] = {"figure": pg4[0]["rate_ratio"], "target": TARGET_RATE_RATIO,
                                         "met": pg4[0]["rate_ratio"] >= TARGET_RATE_RATIO}
    for r in results:
        ratio = r.get("drain_p99_ratio")
        out[f"drain_p99_{r['engine']}_{r['workers']}"] = {
            "figure": ratio, "target": TARGET_P99_RATIO, "met": ratio is not None and ratio < TARGET_P99_RATIO}
    return out


def _hub(r: dict) -> str:
    workers = f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
    return f"{'PostgreSQL' if r['engine'] == 'pg' else 'SQLite'}, {workers}"


def table(results: list[dict], command: str) -> str:
    """The current block under "## Fleet": the run, its targets' table, every configuration's figures."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    first = results[0]
    n = lambda v: f"{v:,}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines = [f"Current run: {first['stores']} stores (regions of {REGION_SIZE}) at {first['rate_per_store']}"
             f" events/s each, {first['outage_stores']} of them returning from an outage with"
             f" {n(first['backlog_per_store'])} events each.", f"Command: `{command}`.", "",
             "| target | figure | command | date |", "| --- | --- | --- | --- |"]
    pg4 = [r for r in results if r["engine"] == "pg" and r["workers"] == 4]
    if pg4:
        r = pg4[0]
        others = ", ".join(f"{x['workers']} worker{'s' if x['workers'] > 1 else ''} {x['rate_ratio']}x"
                           for x in results if x["engine"] == "pg" and x is not r)
        lines.append(f"| 4 workers' ingest >= {TARGET_RATE_RATIO}x plain `COPY` | {n(r['burst']['events_per_s'])} vs"
                     f" {n(r['raw']['events_per_s'])} ev/s: **{r['rate_ratio']}x,"
                     f" {met(r['rate_ratio'] >= TARGET_RATE_RATIO)}**{f' ({others})' if others else ''}"
                     f" | as above | {day} |")
    ratios = ", ".join(f"{_hub(r)} {r['drain_p99_ratio']}x" for r in results)
    worst = max(results, key=lambda r: r.get("drain_p99_ratio") or 0)
    lines += [f"| steady ack p99 during the drain < {TARGET_P99_RATIO:g}x idle | {ratios}:"
              f" **{met((worst.get('drain_p99_ratio') or 99) < TARGET_P99_RATIO)}** | as above | {day} |", "",
              "| hub | stores | burst ingest ev/s | raw same engine ev/s | hub / raw | idle ack p50 / p99 ms"
              " | drain of the returning stores, s (ev/s) | steady ack p99 during drain ms (x idle) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cut = "" if r["burst"].get("complete", True) else f" (cut at --limit-s: {r['burst']['events']} events acked)"
        dcut = "" if r["drain"].get("complete", True) else f" (cut: {r['drain']['events']} of {r['drain']['backlog']})"
        lines.append(
            f"| {_hub(r)} | {r['stores']} | {n(r['burst']['events_per_s'])}{cut}"
            f" | {n(r['raw']['events_per_s'])} ({'`COPY`' if r['engine'] == 'pg' else 'executemany'})"
            f" | {r['rate_ratio']} | {r['idle_ack']['p50_ms']} / {r['idle_ack']['p99_ms']}"
            f" | {r['drain']['seconds']} ({n(r['drain']['events_per_s'])}){dcut}"
            f" | {n(r['drain_ack']['p99_ms'])} ({r['drain_p99_ratio']}x) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--sim":
        asyncio.run(sim_main(int(argv[1]), argv[3].split(","), Path(argv[2])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stores", type=int, default=500)
    p.add_argument("--workers", default="1,2,4", help="PostgreSQL worker counts")
    p.add_argument("--engines", default="sqlite,pg", help="sqlite (1 worker) and/or pg")
    p.add_argument("--rate", type=float, default=0.5, help="events/s each store appends")
    p.add_argument("--outage-s", type=float, default=3600, help="the outage the returning stores' backlog covers")
    p.add_argument("--idle-s", type=float, default=20)
    p.add_argument("--limit-s", type=float, default=300, help="give up a burst or a drain after this long")
    p.add_argument("--store-inflight", type=int, help="each store's sync.max_inflight (default: the agent's)")
    p.add_argument("--quick", action="store_true", help="20 stores, SQLite only, a 20-minute outage: a smoke run")
    p.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    p.add_argument("--workdir")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.store_inflight:
        os.environ["FLEET_STORE_INFLIGHT"] = str(args.store_inflight)   # the simulators read it
    if args.quick:
        args.stores, args.engines, args.outage_s, args.idle_s = min(args.stores, 20), "sqlite", 1200, 3
    engines = args.engines.split(",")
    plan = []
    if "sqlite" in engines:
        plan.append(("sqlite", 1))
    if "pg" in engines:
        if not pg_available():
            print("bench: this tree's hub has no PostgreSQL storage (sync/hub/pg.py): PostgreSQL runs skipped")
        else:
            for w in [int(x) for x in args.workers.split(",")]:
                if w > 1 and not workers_available():
                    print(f"bench: this tree's hub has no shared-subscription workers: {w} workers skipped")
                    continue
                plan.append(("pg", w))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    results = []
    for engine, w in plan:
        results.append(run_config(args, engine, w, work / f"{engine}-{w}"))
    summary = {"results": results, "verdict": verdict(results)}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.write_docs and results:
        shown = [a for i, a in enumerate(argv) if a not in ("--write-docs", "--json") and argv[i - 1:i] != ["--json"]]
        write_docs(table(results, ".venv/bin/python bench/fleet.py " + " ".join(shown)))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_docs(text: str) -> None:
    """Replace the current run under "## Fleet (bench/fleet.py)" (from the line starting
    "Current run:" to the section's end), keeping the prose before it."""
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    head = "## Fleet (bench/fleet.py)\n"
    start = doc.find(head)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + head + "\n" + text
    else:
        end = doc.find("\n## ", start + len(head))
        end = len(doc) if end < 0 else end + 1
        section = doc[start:end]
        t0 = section.find("\nCurrent run:") + 1
        section = section[:t0] + text if t0 > 0 else section.rstrip("\n") + "\n\n" + text
        doc = doc[:start] + section + ("\n" + doc[end:] if end < len(doc) else "")
    path.write_text(doc)


if __name__ == "__main__":
    sys.exit(main())
