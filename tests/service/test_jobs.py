"""Scheduled jobs called directly on a real log; backups, rotation, restore; the disk guard."""

import asyncio
import json
import os
import sqlite3
import types
from pathlib import Path

import pytest

from agent import events as ev
from agent import service
from agent.context import AgentContext
from agent.metrics import Metrics
from agent.syncview import SqliteSyncView
from agent.backup import BackupError, check_backup, list_backups, restore, take_backup
from agent.disk import MIB, DiskGuard
from common.errors import LogLocked, StorageFull
from agent.log import SqliteEventLog
from agent.settings import AgentConfig
from agent.verify import verify_log

STORE = "store-0042"


def command(cid: str, n: int = 1, sku: str = "A1") -> ev.AppendCommand:
    return ev.decode_command(json.dumps(
        {"command_id": cid, "events": [{"type": "received", "sku": sku, "qty": 1 + i} for i in range(n)]}).encode())


def make_config(tmp_path: Path, **storage) -> AgentConfig:
    import msgspec

    return msgspec.convert({"store": {"id": STORE},
                            "storage": {"path": str(tmp_path / "events.db"), **storage},
                            "sync": {"enabled": False}}, AgentConfig)


@pytest.fixture
async def ctx(tmp_path):
    config = make_config(tmp_path, backup_keep=2)
    event_log = await SqliteEventLog.open(config.storage.path, STORE)
    view = SqliteSyncView(tmp_path / "events.sync.db")
    context = AgentContext(config=config, log=event_log, queries=event_log.reader, sync=view, metrics=Metrics())
    yield context
    view.close()
    await event_log.close()


async def test_projection_checkpoint_job_records_the_current_seq(ctx):
    for i in range(5):
        await ctx.log.append(command(f"c{i}", 2, sku=f"S{i}"))
    assert await service.checkpoint_projections(ctx) == 10
    rows = ctx.log.reader.conn.execute("SELECT COUNT(*) FROM stock_checkpoints WHERE seq = 10").fetchone()[0]
    assert rows == 5
    assert ctx.log.reader.stock_as_of("S2", 10)["backroom"] == 3


async def test_wal_checkpoint_job_checkpoints_from_the_writer(ctx):
    for i in range(20):
        await ctx.log.append(command(f"c{i}"))
    busy, wal_pages, done = await service.checkpoint_wal(ctx)
    assert busy == 0 and done == wal_pages and wal_pages > 0


async def test_backup_job_keeps_the_newest_n_checked_copies(ctx, tmp_path):
    made = []
    for i in range(4):
        await ctx.log.append(command(f"c{i}"))
        made.append(await service.backup_log(ctx))
    kept = list_backups(tmp_path / "backups")
    assert kept == [made[2].path, made[3].path]
    assert [check_backup(p) for p in kept] == [(3, []), (4, [])]
    assert not list((tmp_path / "backups").glob("*.partial*"))


async def test_backup_under_write_load_restores_every_event_up_to_its_seq(tmp_path):
    event_log = await SqliteEventLog.open(tmp_path / "events.db", STORE)
    stop = asyncio.Event()
    acked: list[tuple[int, int]] = []

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            result = await event_log.append(command(f"w{w}-{i}", 3, sku=f"K{i % 7}"))
            acked.append((result.first_seq, result.last_seq))
            i += 1

    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    while event_log.last_seq < 300:
        await asyncio.sleep(0.005)
    result = await take_backup(event_log, tmp_path / "backups", keep=3)
    seen_during = event_log.last_seq
    while event_log.last_seq < result.last_seq + 300:
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.gather(*writers)
    await event_log.close()
    assert result.last_seq >= 300 and event_log.last_seq > result.last_seq and seen_during >= result.last_seq

    original = sqlite3.connect(tmp_path / "events.db")
    want = original.execute("SELECT seq, body, hash FROM events WHERE seq <= ? ORDER BY seq",
                            (result.last_seq,)).fetchall()
    target = tmp_path / "restored" / "events.db"
    assert restore(result.path, target) == result.last_seq
    report = verify_log(target)
    assert report.ok, report.problems
    got = sqlite3.connect(target).execute("SELECT seq, body, hash FROM events ORDER BY seq").fetchall()
    assert got == want and [row[0] for row in got] == list(range(1, result.last_seq + 1))
    # Every command acknowledged before the backup's seq is whole in the restored log.
    assert all(last <= result.last_seq for first, last in acked if first <= result.last_seq)


async def test_restore_is_refused_while_the_service_holds_the_log(ctx, tmp_path):
    await ctx.log.append(command("c1"))
    made = await service.backup_log(ctx)
    with pytest.raises(LogLocked, match="held by a running agent"):
        restore(made.path, ctx.config.storage.path)
    assert ctx.log.last_seq == 1


def test_restore_refuses_a_damaged_backup_and_keeps_the_log(tmp_path):
    bad = tmp_path / "events-20261127T000000000Z-seq9.db"
    bad.write_bytes(b"SQLite format 3\0" + os.urandom(4096))
    db = tmp_path / "live" / "events.db"
    db.parent.mkdir()
    db.write_bytes(b"the live log")
    with pytest.raises(BackupError):
        restore(bad, db)
    assert db.read_bytes() == b"the live log"


async def test_restore_cli_puts_the_backup_back_and_keeps_the_old_log(ctx, tmp_path):
    for i in range(3):
        await ctx.log.append(command(f"c{i}"))
    made = await service.backup_log(ctx)
    await ctx.log.append(command("after"))
    await ctx.log.close()
    config = tmp_path / "agent.toml"
    config.write_text(f'[store]\nid = "{STORE}"\n[storage]\npath = "{tmp_path / "events.db"}"\n')
    proc = await asyncio.create_subprocess_exec(
        str(Path(os.sys.executable).parent / "edge-agent"), "--config", str(config), "restore",
        "--from", str(made.path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "events 1..3" in out.decode()
    assert verify_log(tmp_path / "events.db").last_seq == 3
    assert list(tmp_path.glob("events.db.before-restore-*"))


async def test_heartbeat_sends_the_status_line_with_sync_disabled(ctx, tmp_path):
    sent = []
    ctx.notifier = types.SimpleNamespace(send=lambda *lines: sent.append(lines))
    await service.heartbeat(ctx)
    assert sent == [("STATUS=seq 0, sync disabled",)]


async def test_status_line_shows_what_the_sync_process_recorded(ctx, tmp_path):
    from sync.ports import UplinkStatus
    from sync.state import SqliteSyncState

    ctx.config.sync.enabled = True
    for i in range(7):
        await ctx.log.append(command(f"s{i}"))
    state = await SqliteSyncState.open(tmp_path / "events.sync.db", STORE)
    try:
        await state.store_cursor(5, "2026-11-27T13:05:00.123Z", UplinkStatus(connected=True))
        assert "backlog 2, last ack 2026-11-27T13:05:00.123Z, hub connected" in service.status_line(ctx)
    finally:
        await state.close()


async def test_a_failing_job_is_logged_once_per_reason(ctx, caplog):
    calls = []

    async def flaky(context):
        calls.append(1)
        if len(calls) <= 3:
            raise StorageFull("storage: disk is full")

    run = service._once("flaky", flaky, ctx)
    for _ in range(5):
        await run()
    messages = [r.getMessage() for r in caplog.records if "flaky" in r.getMessage()]
    assert messages == ["service: job flaky failed: StorageFull: storage: disk is full",
                        "service: job flaky works again"]


async def test_scheduler_has_every_job_with_misfire_grace(ctx):
    scheduler = service.build_scheduler(ctx)
    scheduler.start(paused=True)  # job defaults apply when the scheduler starts
    jobs = {job.id: job for job in scheduler.get_jobs()}
    scheduler.shutdown(wait=False)
    assert set(jobs) == {"projection_checkpoint", "wal_checkpoint", "heartbeat", "disk_check", "backup",
                         "lease_expiry"}
    assert all(job.misfire_grace_time == 60 and job.coalesce and job.max_instances == 1 for job in jobs.values())


# ------------------------------------------------------------------ disk guard


class FakeFs:
    def __init__(self, free_mb: int):
        self.free = free_mb * MIB
        self.calls = 0

    def statvfs(self, path):
        self.calls += 1
        return types.SimpleNamespace(f_bavail=self.free // 4096, f_frsize=4096)


def test_disk_guard_refuses_below_the_floor_and_resumes_after_the_cache_expires(caplog):
    fs, now = FakeFs(100), [0.0]
    guard = DiskGuard("/state", 64 * MIB, statvfs=fs.statvfs, monotonic=lambda: now[0])
    guard()
    fs.free = 10 * MIB
    guard()                      # cached: still allowed within the second
    now[0] = 1.0
    with pytest.raises(StorageFull, match="10 MiB free under /state, below the 64 MiB floor"):
        guard()
    with pytest.raises(StorageFull):
        guard()
    assert fs.calls == 2         # statvfs at most once per second
    fs.free = 200 * MIB
    now[0] = 2.0
    guard()
    alarms = [r for r in caplog.records if r.name == "edge_agent.disk"]
    assert [r.levelname for r in alarms] == ["ERROR", "WARNING"]  # each transition logged once


async def test_disk_check_job_refreshes_the_guard_at_once(ctx):
    fs = FakeFs(100)
    ctx.disk = guard = DiskGuard("/state", 64 * MIB, statvfs=fs.statvfs, monotonic=lambda: 0.0)
    assert await service.check_disk(ctx) is True
    fs.free = 1 * MIB
    assert await service.check_disk(ctx) is False and guard.full
    assert "DISK FULL" in service.status_line(ctx)
