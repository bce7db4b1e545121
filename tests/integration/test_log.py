"""The SQLite log with real files, what the EventLog contract (test_ports.py) does not say.

Retries batched with new commands, group commit into one transaction, chunked inserts,
append-only triggers, the flock, the store id, projection checkpoints, the time-travel
query plan, verify and rebuild.
"""

import asyncio
import sqlite3
import tempfile
import threading

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from agent import events as ev
from common.errors import LogLocked, StorageError
from agent.inventory import Refused, fold
from agent.log import WRITER_THREAD, SqliteEventLog
from agent.reader import AS_OF_SUMS
from agent.schema import SCHEMA_SQL
from agent.verify import rebuild_projections, verify_log
from tests.unit.strategies import commands


def cmd(command_id, *intents):
    return ev.decode_command(msgspec.json.encode({"command_id": command_id, "events": list(intents)}))


def receive(sku="A", qty=10, location="backroom"):
    return {"type": "received", "sku": sku, "qty": qty, "location": location}


@pytest.fixture
async def log(tmp_path):
    opened = await SqliteEventLog.open(tmp_path / "events.db", "store-1", checkpoint_every=5)
    yield opened
    await opened.close()


def stored_events(path):
    conn = sqlite3.connect(path)
    try:
        return [ev.decode_event(b) for (b,) in conn.execute("SELECT body FROM events ORDER BY seq")]
    finally:
        conn.close()


async def test_retry_that_would_be_refused_now_answers_the_original_seqs(log):
    await log.append(cmd("stock", receive(qty=1)))
    reserve = {"type": "reserved", "sku": "A", "qty": 1, "reservation_id": "r1"}
    first = await log.append(cmd("c-res", reserve))
    again = await log.append(cmd("c-res", reserve))  # deciding it again would refuse: r1 exists
    assert (again.first_seq, again.last_seq, again.duplicate) == (first.first_seq, first.last_seq, True)
    with pytest.raises(Refused) as info:
        await log.append(cmd("c-res", dict(reserve, qty=2)))
    assert info.value.code == "command_conflict"
    assert log.reader.last_seq() == 2


async def test_retries_batched_with_new_commands_append_only_the_new_ones(log):
    before = [await log.append(cmd(f"old{i}", receive(qty=i + 1))) for i in range(3)]
    jobs = [log.append(cmd("new0", receive(qty=5))), log.append(cmd("old1", receive(qty=2))),
            log.append(cmd("new1", receive(qty=7))), log.append(cmd("old2", receive(qty=99))),
            log.append(cmd("old0", receive(qty=1)))]
    new0, old1, new1, old2, old0 = await asyncio.gather(*jobs, return_exceptions=True)
    assert (old1.first_seq, old1.duplicate) == (before[1].first_seq, True)
    assert (old0.first_seq, old0.duplicate) == (before[0].first_seq, True)
    assert isinstance(old2, Refused) and old2.code == "command_conflict"
    assert [(r.first_seq, r.duplicate) for r in (new0, new1)] == [(4, False), (5, False)]
    assert [e.command_id for e in stored_events(log.path)] == ["old0", "old1", "old2", "new0", "new1"]
    assert log.reader.stock("A")["backroom"] == 1 + 2 + 3 + 5 + 7
    assert verify_log(log.path).ok


async def test_appends_waiting_together_share_one_commit(log):
    await log.append(cmd("stock", receive(qty=100)))
    blocker = sqlite3.connect(log.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's next transaction waits (busy_timeout) for this one
    commits = []
    log.add_listener(lambda events: commits.append([e.seq for e in events]))
    tasks = [asyncio.ensure_future(log.append(cmd(f"r{i}", {"type": "reserved", "sku": "A", "qty": 1,
                                                            "reservation_id": f"res{i}"}))) for i in range(40)]
    await asyncio.sleep(0)  # every append is queued while the writer is held
    blocker.execute("COMMIT")
    blocker.close()
    results = await asyncio.gather(*tasks)
    assert sorted(r.first_seq for r in results) == list(range(2, 42))
    assert len(commits) <= 2 and sorted(seq for c in commits for seq in c) == list(range(2, 42))


async def test_appends_take_a_projection_checkpoint_every_n_events(log):
    for i in range(12):
        await log.append(cmd(f"c{i}", receive(sku=f"S{i % 2}", qty=1)))
    seqs = [row[0] for row in sqlite3.connect(log.path).execute("SELECT seq FROM checkpoints ORDER BY seq")]
    assert seqs == [5, 10]
    assert log.reader.stock_as_of("S0", 5)["backroom"] == 3


async def test_a_maintenance_step_after_close_is_refused(tmp_path):
    log = await SqliteEventLog.open(tmp_path / "events.db", "store-1")
    await log.close()
    with pytest.raises(StorageError, match="closing"):
        await log.wal_checkpoint()
    await log.close()  # a second close does nothing


async def test_open_failures_leave_no_writer_thread_and_free_the_lock(tmp_path):
    (tmp_path / "events.db").write_bytes(b"not a database" * 512)
    with pytest.raises(StorageError, match="storage: open .*events.db"):
        await SqliteEventLog.open(tmp_path / "events.db", "store-1")
    assert WRITER_THREAD not in {t.name for t in threading.enumerate()}
    (tmp_path / "events.db").unlink()
    log = await SqliteEventLog.open(tmp_path / "events.db", "store-1")  # the flock was released
    assert WRITER_THREAD in {t.name for t in threading.enumerate()}
    await log.close()
    assert WRITER_THREAD not in {t.name for t in threading.enumerate()}


async def test_commands_of_every_chunk_size_store_every_event_once(log):
    sizes = [1, 3, 255, 256, 257, 1000, 2]
    commands = [cmd(f"c{n}", *(receive(sku=f"S{i % 17}", qty=1 + i % 5) for i in range(n))) for n in sizes]
    results = await asyncio.gather(*(log.append(c) for c in commands))
    assert sorted((r.first_seq, r.last_seq - r.first_seq + 1) for r in results) == sorted(
        zip([1 + sum(sizes[:k]) for k in range(len(sizes))], sizes))
    stored = stored_events(log.path)
    assert [e.seq for e in stored] == list(range(1, sum(sizes) + 1))
    assert len({e.event_id for e in stored}) == len(stored)
    assert [e.qty for e in stored if e.command_id == "c257"] == [1 + i % 5 for i in range(257)]
    assert verify_log(log.path).ok


async def test_update_and_delete_on_events_are_refused_by_sqlite(log):
    await log.append(cmd("c1", receive()))
    conn = sqlite3.connect(log.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only: UPDATE refused"):
            conn.execute("UPDATE events SET body = x'00' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only: DELETE refused"):
            conn.execute("DELETE FROM events")
    finally:
        conn.close()
    assert log.reader.last_seq() == 1


async def test_second_writer_is_refused(log):
    with pytest.raises(LogLocked):
        await SqliteEventLog.open(log.path, "store-1")


async def test_log_of_another_store_is_refused(tmp_path):
    first = await SqliteEventLog.open(tmp_path / "e.db", "store-1")
    await first.close()
    with pytest.raises(StorageError, match="belongs to store 'store-1'"):
        await SqliteEventLog.open(tmp_path / "e.db", "store-2")


def test_time_travel_walks_a_seq_range_not_the_log(tmp_path):
    conn = sqlite3.connect(tmp_path / "plan.db")
    conn.executescript(SCHEMA_SQL)
    plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + AS_OF_SUMS, (0, 10, "A")))
    assert "SEARCH events USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan


async def test_opening_an_older_log_drops_the_sku_index(tmp_path):
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_SQL)
    conn.execute("CREATE INDEX events_by_sku ON events(sku, seq, d_floor, d_backroom, d_reserved)")
    conn.close()
    log = await SqliteEventLog.open(path, "store-1")
    await log.close()
    names = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_by_sku" not in names and "events_by_rid" in names


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands(max_commands=15))
def test_stored_projection_equals_fold_of_events(cmds):
    async def scenario(path):
        log = await SqliteEventLog.open(path, "store-1", checkpoint_every=7)
        try:
            results = await asyncio.gather(*(log.append(c) for c in cmds), return_exceptions=True)
            assert all(isinstance(r, Refused) or not isinstance(r, Exception) for r in results)
            return {row["sku"]: row for row in log.reader.all_stock()}
        finally:
            await log.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/events.db"
        stored = asyncio.run(scenario(path))
        state = fold("store-1", stored_events(path))
        assert {k: (v["floor"], v["backroom"], v["reserved"], v["last_seq"]) for k, v in stored.items()} == {
            k: (s.floor, s.backroom, s.reserved, s.last_seq) for k, s in state.stock.items()}
        assert verify_log(path).ok


def _tamper(path, sql):
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS events_no_update")
        conn.execute(sql)
    finally:
        conn.close()


async def _filled(tmp_path):
    log = await SqliteEventLog.open(tmp_path / "events.db", "store-1", checkpoint_every=4)
    for i in range(10):
        await log.append(cmd(f"c{i}", receive(sku=f"S{i % 3}", qty=i + 1)))
    await log.close()
    return tmp_path / "events.db"


async def test_verify_catches_hand_edited_projection_row(tmp_path):
    path = await _filled(tmp_path)
    assert verify_log(path).ok
    _tamper(path, "UPDATE stock SET backroom = backroom + 1 WHERE sku = 'S1'")
    report = verify_log(path)
    assert not report.ok and any("stock" in p and "S1" in p for p in report.problems)


async def test_verify_catches_broken_hash_chain(tmp_path):
    path = await _filled(tmp_path)
    forged = (b'{"type":"received","seq":5,"event_id":"x","store_id":"store-1","occurred_at":"2026-01-01T00:00:00Z",'
              b'"recorded_at":"2026-01-01T00:00:00Z","command_id":"c4","schema":1,"sku":"S1","qty":5,'
              b'"location":"backroom","ref":null}')
    _tamper(path, f"UPDATE events SET body = x'{forged.hex()}' WHERE seq = 5")
    report = verify_log(path)
    assert any("hash chain broken at seq 5" in p for p in report.problems)


async def test_verify_catches_effect_column_out_of_step_with_body(tmp_path):
    path = await _filled(tmp_path)
    _tamper(path, "UPDATE events SET d_backroom = 99 WHERE seq = 2")
    report = verify_log(path)
    assert any("seq 2: stored effect" in p for p in report.problems)


async def test_verify_catches_a_gap_in_seqs(tmp_path):
    path = await _filled(tmp_path)
    _tamper(path, "UPDATE events SET seq = 12 WHERE seq = 10")
    report = verify_log(path)
    assert "seqs are not gapless: 10 events span 1..12" in report.problems
    assert (report.events, report.last_seq) == (10, 12)


async def test_rebuild_restores_projections_and_checkpoints(tmp_path):
    path = await _filled(tmp_path)
    reader_before = sqlite3.connect(path).execute("SELECT * FROM stock ORDER BY sku").fetchall()
    _tamper(path, "DELETE FROM stock")
    assert not verify_log(path).ok
    conn = sqlite3.connect(path, isolation_level=None)
    assert rebuild_projections(conn, chunk=4) == 10
    conn.close()
    assert sqlite3.connect(path).execute("SELECT * FROM stock ORDER BY sku").fetchall() == reader_before
    assert verify_log(path).ok
    log = await SqliteEventLog.open(path, "store-1", checkpoint_every=4)
    try:
        assert log.reader.stock_as_of("S1", 5)["backroom"] == 2 + 5
        assert (await log.append(cmd("after", receive(sku="S1", qty=1)))).first_seq == 11
    finally:
        await log.close()
