"""Disk full, for real: the state directory on a small tmpfs.

Writes get 507 (never a 2xx that is not durable), reads keep working, writes resume by
themselves when space returns, nothing acknowledged is lost, and verify passes.
Needs root to mount a tmpfs (CI runs as root); it fails, never skips, without it.
"""

import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, agent_command

SIZE_MB = 24


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "state"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {SIZE_MB} MiB tmpfs at {mount} (the disk-full tests need root or"
                    f" CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**20


def fill(path: Path, leave_mb: float) -> None:
    """Write a filler file until about `leave_mb` MiB are free (0: until ENOSPC)."""
    chunk = b"\0" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while free_mb(path.parent) > leave_mb:
            os.write(fd, chunk)
        if leave_mb == 0:
            while True:
                os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def post(agent, cid: str, n: int = 1):
    return agent.request("POST", "/v1/events", {"command_id": cid, "events": [
        {"type": "received", "sku": "A1", "qty": 1, "ref": "x" * 120} for _ in range(n)]})


def poll_status(agent, want: int, prefix: str, timeout: float = 10.0):
    deadline, i = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        status, body = post(agent, f"{prefix}-{i}")
        if status == want:
            return status, body, f"{prefix}-{i}"
        i += 1
        time.sleep(0.1)
    pytest.fail(f"no {want} for writes within {timeout}s (last: {status} {body})")


def run_verify(agent) -> subprocess.CompletedProcess:
    return subprocess.run([*agent_command(), "--config", str(agent.config_path), "verify"],
                          capture_output=True, text=True, timeout=60)


def test_writes_get_507_under_the_floor_and_resume_when_space_returns(tmp_path, small_disk):
    agent = AgentProcess(tmp_path, db_path=small_disk / "events.db",
                         sections={"sync": {"enabled": False}, "storage": {"min_free_mb": 8},
                                   "service": {"backup_interval_s": 0}})
    acked = {}
    with agent:
        for i in range(20):
            status, body = post(agent, f"before-{i}")
            assert status == 201, body
            acked[f"before-{i}"] = body["first_seq"]
        filler = small_disk / "filler"
        fill(filler, leave_mb=4)
        status, body, _ = poll_status(agent, 507, "floor")
        assert body["error"]["code"] == "storage_full"
        assert "min_free_mb" in body["error"]["message"]
        status, stock = agent.request("GET", "/v1/stock/A1")
        # Reads keep working (writes that got in before the cached check expired count too).
        assert status == 200 and stock["backroom"] == stock["last_seq"] >= 20
        assert agent.request("GET", "/healthz")[0] == 200
        filler.unlink()
        status, body, cid = poll_status(agent, 201, "after")    # by themselves, no restart
        acked[cid] = body["first_seq"]
        assert agent.terminate() == 0
    out = agent.output()
    assert out.count("below storage.min_free_mb=8") == 1, out  # the alarm, logged once
    assert "writes resume" in out
    report = run_verify(agent)
    assert report.returncode == 0, report.stdout + report.stderr
    conn = sqlite3.connect(small_disk / "events.db")
    stored = dict(conn.execute("SELECT command_id, seq FROM events"))
    assert all(stored.get(cid) == seq for cid, seq in acked.items()), acked


def test_sqlite_disk_full_is_507_and_loses_nothing_acknowledged(tmp_path, small_disk):
    agent = AgentProcess(tmp_path, db_path=small_disk / "events.db",
                         sections={"sync": {"enabled": False}, "storage": {"min_free_mb": 0},
                                   "service": {"backup_interval_s": 0}})
    acked: dict[str, tuple[int, int]] = {}
    statuses = []
    with agent:
        for i in range(5):
            status, body = post(agent, f"before-{i}", n=50)
            assert status == 201, body
            acked[f"before-{i}"] = (body["first_seq"], body["last_seq"])
        fill(small_disk / "filler", leave_mb=0)
        for i in range(200):
            status, body = post(agent, f"full-{i}", n=200)
            statuses.append(status)
            if status == 201:
                acked[f"full-{i}"] = (body["first_seq"], body["last_seq"])
            if statuses.count(507) >= 3:
                break
        assert set(statuses) <= {201, 507}, statuses
        assert 507 in statuses, "SQLite never reported the disk full"
        status, stock = agent.request("GET", "/v1/stock/A1")
        assert status == 200 and stock["last_seq"] == max(last for _, last in acked.values())
        (small_disk / "filler").unlink()
        status, body, cid = poll_status(agent, 201, "resumed")
        acked[cid] = (body["first_seq"], body["last_seq"])
        assert agent.terminate() == 0
    report = run_verify(agent)
    assert report.returncode == 0, report.stdout + report.stderr
    conn = sqlite3.connect(small_disk / "events.db")
    for cid, (first, last) in acked.items():
        rows = conn.execute("SELECT COUNT(*) FROM events WHERE command_id = ? AND seq BETWEEN ? AND ?",
                            (cid, first, last)).fetchone()[0]
        assert rows == last - first + 1, cid
