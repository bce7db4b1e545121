"""Benchmark the local API as kiosks and tills use it (a script, not a test).

    .venv/bin/python bench/kiosk.py [reads|writes|all] [--duration 10] [--skus 100000]

(a) reads: GET /v1/availability/{sku} over `--skus` SKUs from 16 concurrent keep-alive
    clients, against a bare aiohttp handler returning a constant, measured in the same run.
(b) writes: single-event POST /v1/events from 32 concurrent clients at synchronous=FULL,
    against plain sqlite3 inserts at the same durability (one row per commit, and 32 rows
    per commit, the group-commit ceiling).

The server under test runs as a real `edge-agent run` subprocess; the load generator
runs in another process (an aiohttp client with keep-alive), so neither distorts the
other beyond sharing the machine's cores. (b) also runs with wrk (Debian package `wrk`,
a C load generator: 2 threads, 32 keep-alive connections, unique command ids from a Lua
script) when it is installed, since the Python client itself takes half a core of the
two that the server shares it with. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.agentproc import AgentProcess, free_port  # noqa: E402


# ------------------------------------------------------------------ load client


async def _load(url: str, kind: str, clients: int, duration: float, skus: int, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup
    counted = 0
    pid = os.getpid()

    async def worker(w: int, http: aiohttp.ClientSession) -> None:
        nonlocal errors, counted
        rnd = random.Random(w)
        n = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            if kind in ("read", "bare"):
                async with http.get(f"{url}/v1/availability/SKU-{rnd.randrange(skus):06d}") as resp:
                    await resp.read()
                    ok = resp.status == 200
            else:
                n += 1
                body = {"command_id": f"bench-{pid}-{w}-{n}",
                        "events": [{"type": "sold", "sku": f"SKU-{rnd.randrange(skus):06d}", "qty": 1}]}
                async with http.post(f"{url}/v1/events", json=body) as resp:
                    await resp.read()
                    ok = resp.status == 201
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                counted += 1
                if not ok:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(w, http) for w in range(clients)))
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {"requests": counted, "errors": errors, "per_s": round(counted / duration, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "clients": clients, "duration_s": duration}


def run_load(url: str, kind: str, clients: int, duration: float, skus: int, warmup: float = 1.0) -> dict:
    """Run the load generator in its own process; return its measurements."""
    out = subprocess.run(
        [sys.executable, __file__, "load", "--url", url, "--kind", kind, "--clients", str(clients),
         "--duration", str(duration), "--skus", str(skus), "--warmup", str(warmup)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ bare server


def bare_server(port: int) -> None:
    """A bare aiohttp handler returning a constant availability answer (the ceiling)."""
    from aiohttp import web

    body = json.dumps({"sku": "SKU-000000", "here": {"floor": 3, "backroom": 7, "reserved": 0, "available": 10},
                       "nearby": [], "online": None, "snapshot": None}).encode()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/availability/{sku}", handler)
    app.router.add_get("/readyz", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def wait_http(url: str, timeout: float = 15) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ------------------------------------------------------------------ scenarios


def seed(db: Path, skus: int) -> None:
    """Create a log with `skus` SKUs (1000 received events per command)."""
    from agent import events as ev
    from agent.log import SqliteEventLog

    async def run() -> None:
        log = await SqliteEventLog.open(db, "store-bench", synchronous="NORMAL")
        try:
            for start in range(0, skus, 1000):
                intents = [ev.Receive(sku=f"SKU-{i:06d}", qty=10 + i % 7, location="floor")
                           for i in range(start, min(skus, start + 1000))]
                await log.append(ev.AppendCommand(command_id=f"seed-{start}", events=intents))
        finally:
            await log.close()

    asyncio.run(run())


def _median(rounds: list[dict]) -> dict:
    """The median round by req/s, with the totals of all rounds."""
    ordered = sorted(rounds, key=lambda r: r["per_s"])
    mid = dict(ordered[len(ordered) // 2])
    mid["rounds_per_s"] = [r["per_s"] for r in rounds]
    return mid


def bench_reads(work: Path, args: argparse.Namespace) -> list[dict]:
    db = work / "reads.db"
    t0 = time.perf_counter()
    seed(db, args.skus)
    print(f"seeded {args.skus} SKUs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "bare", "--port", str(port)])
    agent = AgentProcess(work / "reads-agent", store_id="store-bench", db_path=db)
    agent.dir.mkdir(exist_ok=True)
    bare_rounds, agent_rounds = [], []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        agent.start()
        # Alternate short rounds so both servers see the same background load on a shared machine.
        per_round = args.duration / args.rounds
        for _ in range(args.rounds):
            bare_rounds.append(run_load(f"http://127.0.0.1:{port}", "bare", 16, per_round, args.skus))
            agent_rounds.append(run_load(agent.url, "read", 16, per_round, args.skus))
    finally:
        bare.terminate()
        bare.wait()
        if agent.running:
            agent.terminate()
    b, a = _median(bare_rounds), _median(agent_rounds)
    ratios = [x["per_s"] / y["per_s"] for x, y in zip(agent_rounds, bare_rounds)]
    return [{"bench": "reads", "server": "bare aiohttp handler (constant)", **b},
            {"bench": "reads", "server": "edge-agent GET /v1/availability/{sku}", **a},
            {"bench": "reads", "ratio_vs_bare_median": round(sorted(ratios)[len(ratios) // 2], 3),
             "ratio_per_round": [round(r, 3) for r in ratios]}]


def sqlite_baseline(work: Path, rows_per_commit: int, duration: float) -> dict:
    """Plain sqlite3 inserts (WAL, synchronous=FULL) of event-sized rows."""
    path = work / f"plain-{rows_per_commit}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, body BLOB)")
    body = b'{"type":"sold","sku":"SKU-000001","qty":1,"location":"floor"}' + b" " * 200
    seq, commits = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        conn.execute("BEGIN")
        for _ in range(rows_per_commit):
            seq += 1
            conn.execute("INSERT INTO events VALUES (?, ?, ?)", (seq, f"id-{seq}", body))
        conn.execute("COMMIT")
        commits += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return {"bench": "writes", "server": f"plain sqlite3, {rows_per_commit} row(s) per commit, synchronous=FULL",
            "per_s": round(seq / elapsed, 1), "commit_ms": round(elapsed / commits * 1000, 3)}


WRK_SCRIPT = """
local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
end
function init(args)
  counter = 0
  math.randomseed(tid * 7919)
end
function request()
  counter = counter + 1
  local body = string.format('{"command_id":"wrk-%d-%d","events":[{"type":"sold","sku":"SKU-%06d","qty":1}]}',
                             tid, counter, math.random(0, SKUS - 1))
  return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  io.write(string.format("WRK %d %d %d %.3f %.3f\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(url: str, work: Path, clients: int, duration: float, skus: int) -> dict:
    """POST single-event commands with wrk; return the same fields as the Python client."""
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.replace("SKUS", str(skus)))
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{duration:g}s", "-s", str(script), url],
                         check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    _, requests, micros, errors, p50, p99 = line.split()
    return {"requests": int(requests), "errors": int(errors), "per_s": round(int(requests) / (int(micros) / 1e6), 1),
            "p50_ms": float(p50), "p99_ms": float(p99), "clients": clients, "duration_s": duration}


def bench_writes(work: Path, args: argparse.Namespace) -> list[dict]:
    results = [sqlite_baseline(work, 1, min(args.duration, 5)), sqlite_baseline(work, 32, min(args.duration, 5))]
    clients = [("python", run_load)]
    if shutil.which("wrk"):
        clients.append(("wrk", lambda url, kind, n, duration, skus: run_wrk(url, work, n, duration, skus)))
    else:
        print("bench: wrk is not installed (apt-get install wrk); writes measured with the Python client only",
              file=sys.stderr)
    from agent.verify import verify_log
    for name, load in clients:
        agent = AgentProcess(work / f"writes-agent-{name}", store_id="store-bench", synchronous="FULL")
        agent.dir.mkdir(exist_ok=True)
        agent.start()
        try:
            r = load(agent.url, "write", 32, args.duration, args.skus)
            results.append({"bench": "writes", "client": name,
                            "server": "edge-agent POST /v1/events (1 event each), synchronous=FULL", **r})
        finally:
            assert agent.terminate() == 0
        report = verify_log(agent.db_path)
        results.append({"bench": "writes", "client": name, "verify_ok": report.ok, "events_in_log": report.last_seq,
                        "answered_201": r["requests"] - r["errors"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["reads", "writes", "all", "load", "bare"], nargs="?", default="all")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--skus", type=int, default=100_000)
    parser.add_argument("--url")
    parser.add_argument("--kind", choices=["read", "bare", "write"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating read rounds per server")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.what == "load":
        print(json.dumps(asyncio.run(_load(args.url, args.kind, args.clients, args.duration, args.skus,
                                           args.warmup))))
        return
    if args.what == "bare":
        bare_server(args.port)
        return
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:
        work = Path(tmp)
        results = []
        if args.what in ("reads", "all"):
            results += bench_reads(work, args)
        if args.what in ("writes", "all"):
            results += bench_writes(work, args)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
