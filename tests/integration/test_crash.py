"""SIGKILL a real writer process at random moments: no reported commit is lost, no gap,
no command stored twice, and verify passes after every crash."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.verify import verify_log

ROOT = Path(__file__).resolve().parents[2]
CYCLES = 50


def run_writer(db, start, retry, kill_after):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.crash_writer", str(db), str(start), ",".join(map(str, retry))],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    began, reported = set(), {}
    deadline = time.monotonic() + 30
    # Let it commit something first, then kill at a random moment.
    for line in proc.stdout:
        kind, k, *rest = line.split()
        if kind == "begin":
            began.add(int(k))
        else:
            reported[int(k)] = tuple(map(int, rest))
        if len(reported) >= kill_after or time.monotonic() > deadline:
            time.sleep(random.uniform(0, 0.01))
            break
    os.kill(proc.pid, signal.SIGKILL)
    rest_out, err = proc.communicate(timeout=10)
    for line in rest_out.splitlines():  # lines written before the kill still count as reported
        kind, k, *rest = line.split()
        if kind == "begin":
            began.add(int(k))
        elif len(rest) == 3:
            reported[int(k)] = tuple(map(int, rest))
    assert proc.returncode == -signal.SIGKILL, err
    return began, reported


def committed(db):
    conn = sqlite3.connect(db)
    try:
        return {cid: (first, last) for cid, first, last in
                conn.execute("SELECT command_id, first_seq, last_seq FROM commands")}
    finally:
        conn.close()


def test_sigkilled_writer_never_loses_a_reported_commit(tmp_path):
    db = tmp_path / "events.db"
    rng = random.Random(1234)
    reported_all: dict[int, tuple[int, int]] = {}
    started: set[int] = set()
    next_k = 0
    dup_retries = 0
    for cycle in range(CYCLES):
        pending = sorted(started - set(reported_all))
        began, reported = run_writer(db, next_k, pending, kill_after=rng.randint(1, 40))
        started |= began
        next_k = max(started) + 1
        for k, (first, last, dup) in reported.items():
            if k in reported_all:
                assert reported_all[k] == (first, last), f"cycle {cycle}: cmd-{k} changed seqs"
            reported_all[k] = (first, last)
            dup_retries += dup
        stored = committed(db)
        for k, seqs in reported_all.items():
            assert stored.get(f"cmd-{k}") == seqs, f"cycle {cycle}: reported cmd-{k} {seqs} lost"
        report = verify_log(db)
        assert report.ok, f"cycle {cycle}: {report.render()}"
    # Heal: one last run retries everything started but unreported; each must resolve once.
    pending = sorted(started - set(reported_all))
    began, reported = run_writer(db, next_k, pending, kill_after=len(pending) + 5)
    stored = committed(db)
    for k in pending:
        assert f"cmd-{k}" in stored, f"retried cmd-{k} missing"
    conn = sqlite3.connect(db)
    per_command = conn.execute("SELECT command_id, COUNT(*), MIN(seq), MAX(seq) FROM events GROUP BY command_id").fetchall()
    conn.close()
    for cid, count, low, high in per_command:
        assert (low, high) == stored[cid] and count == high - low + 1, f"{cid} stored twice or split"
    assert verify_log(db).ok
    print(f"crash test: {CYCLES} SIGKILL cycles, {len(reported_all)} reported commits, "
          f"{len(stored)} commands stored, {dup_retries} retries answered as duplicates, 0 lost")
