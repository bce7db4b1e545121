"""Append and replay speed of the event log, against plain sqlite3 in the same run.

usage: uv run python bench/append.py [--events-1m 1000000] [--seconds 3] [--dir DIR]

Measures, each against plain sqlite3 doing the same inserts (same tables, columns and
indexes, WAL, same `synchronous`):
  (a) one event per command, each awaited            vs one command + commit at a time
  (b) 64 concurrent single-event commands (group commit)  vs 1000-event transactions
  (c) 100-event commands, each awaited               vs 100-event transactions
Two plain baselines: "same rows" writes what the log writes for each command (the event
rows, the command's idempotency row, the stock upsert of each SKU it touches), "events
only" just the event rows. For (b) also plain "same rows" in 64-event transactions: 64
concurrent one-event commands can never group more than 64 events into one commit.
and then, over a log of --events-1m events: `rebuild` and `verify` time.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import events as ev  # noqa: E402
from agent.log import SqliteEventLog  # noqa: E402
from agent.schema import SCHEMA_SQL  # noqa: E402
from agent.verify import rebuild_projections, verify_log  # noqa: E402

SKUS = 1000


def command(cid: str, n: int, base: int) -> ev.AppendCommand:
    intents = [{"type": "received", "sku": f"SKU-{(base + i) % SKUS:05d}", "qty": 1 + i % 7,
                "location": "floor" if i % 2 else "backroom"} for i in range(n)]
    return ev.decode_command(msgspec.json.encode({"command_id": cid, "events": intents}))


def plain_rows(n: int, start: int) -> list[tuple]:
    body = (b'{"type":"received","seq":1,"event_id":"01a21d35-0047-72d8-a261-74e8c93c29b5","store_id":"bench",'
            b'"occurred_at":"2026-11-27T13:32:22.471Z","recorded_at":"2026-11-27T13:32:22.471Z","command_id":'
            b'"c","schema":1,"sku":"SKU-00001","qty":3,"location":"floor","ref":null}')
    return [(start + i, f"01a21d35-{start + i:016x}", f"c{start + i}", "received", 1,
             f"SKU-{(start + i) % SKUS:05d}", None, 1, 0, 0, body, os.urandom(32)) for i in range(n)]


def plain_db(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(SCHEMA_SQL)
    return conn


INSERT = ("INSERT INTO events(seq, event_id, command_id, type, schema, sku, rid, d_floor, d_backroom, d_reserved,"
          " body, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")


INSERT_COMMAND = "INSERT INTO commands(command_id, body_hash, first_seq, last_seq, recorded_at) VALUES (?,?,?,?,?)"
UPSERT_STOCK = ("INSERT INTO stock(sku, floor, backroom, reserved, last_seq) VALUES (?,1,0,0,?)"
                " ON CONFLICT(sku) DO UPDATE SET floor = floor + 1, last_seq = excluded.last_seq")


def plain_rate(path: Path, synchronous: str, per_txn: int, seconds: float, per_cmd: int = 0,
               workers: int = 1) -> float:
    """Plain sqlite3: `per_txn` events per commit; with per_cmd, also the log's other rows."""
    conn = plain_db(path, synchronous)
    seq, done, t0 = 1, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rows = plain_rows(per_txn, seq)
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows)
        if per_cmd:
            # Command ids as the log's bench clients make them: w{worker}-{k}.
            conn.executemany(INSERT_COMMAND, [
                (f"w{(s // per_cmd) % workers}-{s // per_cmd // workers}", os.urandom(32), s, s + per_cmd - 1,
                 "2026-11-27T13:32:22.471Z") for s in range(seq, seq + per_txn, per_cmd)])
            conn.executemany(UPSERT_STOCK, [(r[5], r[0]) for r in rows])
        conn.execute("COMMIT")
        seq += per_txn
        done += per_txn
    rate = done / (time.perf_counter() - t0)
    conn.close()
    return rate


async def log_rate(path: Path, synchronous: str, per_cmd: int, concurrency: int, seconds: float) -> float:
    log = await SqliteEventLog.open(path, "bench", synchronous=synchronous)
    done = 0
    stop_at = time.perf_counter() + seconds
    t0 = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal done
        k = 0
        while time.perf_counter() < stop_at:
            await log.append(command(f"w{w}-{k}", per_cmd, k))
            k += 1
            done += per_cmd

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    rate = done / (time.perf_counter() - t0)
    await log.close()
    return rate


async def fill(path: Path, total: int) -> float:
    from tqdm import tqdm

    log = await SqliteEventLog.open(path, "bench", synchronous="NORMAL")
    t0 = time.perf_counter()
    with tqdm(total=total, unit="ev", unit_scale=True, desc="fill", disable=not sys.stderr.isatty()) as bar:
        k = 0
        while k * 1000 < total:
            jobs = [log.append(command(f"f{k + j}", 1000, (k + j) * 1000)) for j in range(4)]
            await asyncio.gather(*jobs)
            k += 4
            bar.update(4000)
    await log.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events-1m", type=int, default=1_000_000, dest="big")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--dir", default=None, help="where to put the databases (default: a temp dir)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-append-"))
    base.mkdir(parents=True, exist_ok=True)
    sync, secs = args.synchronous, args.seconds

    def fresh(name: str) -> Path:
        p = base / name
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{p}{suffix}").unlink(missing_ok=True)
        return p

    rows = []
    grouped = None
    cases = [
        ("(a) 1-event commands, each awaited", (1, 1), 1),
        ("(b) 64 concurrent 1-event commands (group commit)", (1, 64), 1000),
        ("(c) 100-event commands, each awaited", (100, 1), 100),
    ]
    for label, (per_cmd, conc), plain_txn in cases:
        ours = asyncio.run(log_rate(fresh("log.db"), sync, per_cmd, conc, secs))
        same = plain_rate(fresh("plain.db"), sync, plain_txn, secs, per_cmd=per_cmd, workers=conc)
        plain = plain_rate(fresh("plain.db"), sync, plain_txn, secs)
        rows.append((label, ours, f"plain sqlite3, {plain_txn}-event txns", same, plain))
        print(f"{label}: {ours:,.0f} ev/s vs plain {same:,.0f} ev/s same rows ({ours / same:.2f}x), "
              f"{plain:,.0f} ev/s events only ({ours / plain:.2f}x)", flush=True)
        if conc > 1:
            at_most = plain_rate(fresh("plain.db"), sync, conc * per_cmd, secs, per_cmd=per_cmd, workers=conc)
            grouped = (label[:3], ours, conc * per_cmd, at_most)
            print(f"{label[:3]} vs plain same rows in {conc * per_cmd}-event txns: {at_most:,.0f} ev/s "
                  f"({ours / at_most:.2f}x)", flush=True)

    big = fresh("big.db")
    fill_s = asyncio.run(fill(big, args.big))
    conn = sqlite3.connect(big, isolation_level=None)
    t0 = time.perf_counter()
    count = rebuild_projections(conn, 10_000)
    rebuild_s = time.perf_counter() - t0
    conn.close()
    t0 = time.perf_counter()
    report = verify_log(big)
    verify_s = time.perf_counter() - t0
    assert report.ok, report.render()
    print(f"fill {count:,} events: {fill_s:.1f} s ({count / fill_s:,.0f} ev/s in 1000-event commands)")
    print(f"rebuild: {rebuild_s:.2f} s ({count / rebuild_s:,.0f} ev/s); verify: {verify_s:.2f} s "
          f"({count / verify_s:,.0f} ev/s)")

    print("\n| case | edge-agent log | raw baseline | same rows | ratio | events only | ratio |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for label, ours, what, same, plain in rows:
        print(f"| {label} | {ours:,.0f} ev/s | {what} | {same:,.0f} ev/s | {ours / same:.2f}x "
              f"| {plain:,.0f} ev/s | {ours / plain:.2f}x |")
    if grouped:
        label, ours, size, at_most = grouped
        print(f"| {label} again | {ours:,.0f} ev/s | plain sqlite3, {size}-event txns | {at_most:,.0f} ev/s "
              f"| {ours / at_most:.2f}x | | |")
    print(f"| rebuild {count:,} events | {rebuild_s:.2f} s | | | | | |")
    print(f"| verify {count:,} events (hash chain, effects, projections) | {verify_s:.2f} s | | | | | |")
    print(f"\nsqlite {sqlite3.sqlite_version}, synchronous={sync}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
