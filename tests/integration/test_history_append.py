"""Appending the hub's history to a log (agent/history.py), with real SQLite files.

A second log built from the first one's stored rows, in chunks that cut commands in
two, must be the first one: same events byte for byte, same chain, projections (stock,
reservations, cap usage, time marks) equal replay (`verify`), retries of its commands
answered as duplicates. A history that does not continue the log is refused whole.
"""

from __future__ import annotations

import sqlite3

import msgspec
import pytest

from agent import events as ev
from agent.history import HistoryRefused
from agent.log import SqliteEventLog
from agent.verify import verify_log
from common import chain


def cmd(command_id, *intents):
    return ev.decode_command(msgspec.json.encode({"command_id": command_id, "events": list(intents)}))


COMMANDS = [
    cmd("c1", {"type": "received", "sku": "A", "qty": 10, "location": "floor"},
        {"type": "received", "sku": "B", "qty": 5}),
    cmd("c2", {"type": "sold", "sku": "A", "qty": 2}),
    cmd("c3", {"type": "reserved", "sku": "A", "qty": 3, "reservation_id": "r1"},
        {"type": "reserved", "sku": "B", "qty": 1, "reservation_id": "r2"}),
    cmd("c4", {"type": "reservation_released", "reservation_id": "r1"}),
    cmd("c5", {"type": "counted", "sku": "B", "location": "backroom", "counted": 9},
        {"type": "moved", "sku": "B", "qty": 2, "from": "backroom", "to": "floor"},
        {"type": "reservation_fulfilled", "reservation_id": "r2"}),
    cmd("c6", {"type": "adjusted", "sku": "A", "location": "floor", "delta": -1, "reason": "damaged"}),
]


def rows_of(path) -> list[tuple[int, bytes, bytes]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT seq, body, hash FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def tables(path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    try:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("stock", "reservations", "cap_usage", "time_marks")} | {
            "commands": conn.execute("SELECT command_id, first_seq, last_seq, recorded_at FROM commands"
                                     " ORDER BY 1").fetchall()}
    finally:
        conn.close()


@pytest.fixture
async def source(tmp_path):
    log = await SqliteEventLog.open(tmp_path / "a.db", "store-1")
    for command in COMMANDS:
        await log.append(command)
    await log.close()
    return tmp_path / "a.db"


async def test_a_history_appended_in_chunks_is_the_same_log(tmp_path, source):
    rows = rows_of(source)
    assert len(rows) == 10
    log = await SqliteEventLog.open(tmp_path / "b.db", "store-1")
    try:
        # Chunks cut c1, c3 and c5 in two; the first without hashes (an unanchored hub).
        appended = await log.append_history([(s, b, None) for s, b, _ in rows[:1]])
        assert [e.seq for e in appended] == [1] and log.last_seq == 1
        for chunk in (rows[1:4], rows[4:8], rows[8:]):
            await log.append_history(chunk)
        assert log.last_seq == 10
        b = tables(tmp_path / "b.db")
        again = await log.append(COMMANDS[4])   # a retry of a command known only from the history
        assert (again.first_seq, again.last_seq, again.duplicate) == (7, 9, True)
        fresh = await log.append(cmd("c7", {"type": "sold", "sku": "B", "qty": 1}))
        assert fresh.first_seq == 11
    finally:
        await log.close()
    assert rows_of(tmp_path / "b.db")[:10] == rows
    report = verify_log(tmp_path / "b.db")
    assert report.ok, report.render()
    a = tables(source)
    for table in ("stock", "reservations", "cap_usage", "time_marks", "commands"):
        assert a[table] == b[table], table


@pytest.mark.parametrize("case", ["gap", "other_chain", "other_store", "not_an_event"])
async def test_a_history_that_does_not_continue_the_log_is_refused_whole(tmp_path, source, case):
    rows = rows_of(source)
    log = await SqliteEventLog.open(tmp_path / "b.db", "store-1")
    try:
        await log.append_history(rows[:3])
        bad = list(rows[3:6])
        if case == "gap":
            bad = bad[1:]
        elif case == "other_chain":
            bad[0] = (bad[0][0], bad[0][1], chain.link(b"\x01" * 32, bad[0][1]))
        elif case == "other_store":
            body = bad[1][1].replace(b'"store-1"', b'"store-2"')
            bad[1] = (bad[1][0], body, None)
        else:
            bad[2] = (bad[2][0], b'{"nope":1}', None)
        with pytest.raises(HistoryRefused):
            await log.append_history(bad)
        assert log.last_seq == 3
        # Nothing of the refused history was written; the right one still appends.
        await log.append_history(rows[3:])
        assert log.last_seq == 10
    finally:
        await log.close()
    assert rows_of(tmp_path / "b.db") == rows
    assert verify_log(tmp_path / "b.db").ok


async def test_every_append_is_fenced_while_the_hub_holds_more(tmp_path, source):
    """The fence is the log's, so the service's own appends (lease expiry) wait too."""
    from agent.inventory import Refused
    from agent.rehydrate import Rehydrator
    from sync.state import SqliteSyncState

    state = await SqliteSyncState.open(tmp_path / "sync.db", "store-1")
    await state.store_hub_ack(10, 1, "2026-11-27T10:00:00.000Z")
    log = await SqliteEventLog.open(tmp_path / "b.db", "store-1")
    rehydrator = Rehydrator(log, tmp_path / "sync.db")
    try:
        await rehydrator.start()
        log.write_fence = rehydrator.refusal
        with pytest.raises(Refused) as refused:
            await log.append(COMMANDS[0])
        assert (refused.value.code, refused.value.status) == ("rehydrating", 503)
        assert "1..10" in refused.value.message and log.last_seq == 0
        # The staged history is appended by the rehydrator; then appends go on after it.
        await state.stage_history(rows_of(source), 0)
        assert await rehydrator.step() == 10
        assert rehydrator.fence() is None
        assert (await log.append(cmd("c7", {"type": "sold", "sku": "B", "qty": 1}))).first_seq == 11
    finally:
        rehydrator.close()
        await log.close()
        await state.close()
