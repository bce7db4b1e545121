"""The sync process's read-only view of the log (sync/feed.py): batches cut and joined inside SQLite
against the cut done in Python, and the data_version poll that tells it of new events."""

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent.log import SqliteEventLog
from agent.reader import LogReader
from sync.feed import SqliteLogFeed


def _received(i: int, ref_len: int) -> dict:
    return {"type": "received", "sku": f"S{i % 7}", "qty": 1 + i % 5, "ref": "r" * max(1, ref_len)}


async def _log_with(path, ref_lens: list[int]) -> None:
    log = await SqliteEventLog.open(path, "store-1")
    try:
        for i, n in enumerate(ref_lens):
            command = {"command_id": f"c{i}", "events": [_received(i, n)]}
            await log.append(ev.decode_command(msgspec.json.encode(command)))
    finally:
        await log.close()


def _python_cut(rows: list[tuple[int, bytes]], after: int, max_events: int, max_bytes: int):
    """The greedy cut the uplink did in Python before: the reference."""
    part, size = [], 0
    for seq, body in rows:
        if seq <= after:
            continue
        size += len(body) + 1
        if len(part) == max_events or (size > max_bytes and part):
            break
        part.append((seq, body))
    if not part:
        return None
    return part[-1][0], len(part), b",".join(body for _, body in part)


@pytest.fixture(scope="module")
def varied_log(tmp_path_factory):
    import asyncio

    path = tmp_path_factory.mktemp("batches") / "events.db"
    lens = [(i * 37) % 128 for i in range(60)]
    asyncio.run(_log_with(path, lens))
    reader = LogReader(path)
    rows = reader.events_after(0, 1000)
    reader.close()
    feed = SqliteLogFeed(path)
    yield feed, rows
    feed.close()


def _cut(feed, after, max_events, max_bytes):
    batch = feed.batch(after, max_events, max_bytes)
    if batch is None:
        return None
    assert batch.first_seq == after + 1
    return batch.last_seq, batch.count, batch.bodies


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(after=st.integers(0, 61), max_events=st.integers(1, 70), max_bytes=st.integers(1, 8_000))
def test_joined_batch_is_the_python_cut(varied_log, after, max_events, max_bytes):
    reader, rows = varied_log
    assert _cut(reader, after, max_events, max_bytes) == _python_cut(rows, after, max_events, max_bytes)


def test_an_event_larger_than_the_byte_cap_goes_alone(varied_log):
    reader, rows = varied_log
    last, count, joined = _cut(reader, 0, 500, 10)
    assert (last, count, joined) == (1, 1, rows[0][1])


def test_joined_bodies_decode_in_seq_order(varied_log):
    reader, _ = varied_log
    last, count, joined = _cut(reader, 10, 25, 1_000_000)
    seqs = [e["seq"] for e in msgspec.json.decode(b"[" + joined + b"]")]
    assert (last, count, seqs) == (35, 25, list(range(11, 36)))


async def test_events_at_an_older_schema_go_as_stored_with_the_chain_hashes(tmp_path, monkeypatch):
    """The hub must get the bytes the chain covers: no upcast on the way out (its readers upcast)."""
    import sqlite3

    from common import chain

    path = tmp_path / "events.db"
    await _log_with(path, [3, 5, 8, 2])
    monkeypatch.setattr(ev, "CURRENT_SCHEMA", 2)  # every stored event (schema 1) is now older
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT body, hash FROM events ORDER BY seq").fetchall()
    reader = SqliteLogFeed(path)
    try:
        first = reader.batch(0, 2, 1_000_000)
        second = reader.batch(2, 10, 1_000_000)
    finally:
        reader.close()
    assert first.bodies == b",".join(body for body, _ in stored[:2])
    assert (first.prev_hash, first.last_hash) == (chain.GENESIS, stored[1][1])
    assert (second.first_seq, second.last_seq, second.prev_hash, second.last_hash) == (3, 4, stored[1][1], stored[3][1])
    assert chain.hashes(second.prev_hash, [body for body, _ in stored[2:]])[-1] == second.last_hash


def test_nothing_after_the_end_is_none(varied_log):
    reader, _ = varied_log
    assert _cut(reader, 60, 10, 1000) is None


async def test_changed_tells_of_a_commit_by_the_writer_and_only_then(tmp_path):
    path = tmp_path / "events.db"
    await _log_with(path, [3])
    feed = SqliteLogFeed(path)
    try:
        assert feed.changed() is True          # the first poll: unknown before
        assert feed.changed() is False
        assert feed.last_seq() == 1
        log = await SqliteEventLog.open(path, "store-1")
        try:
            assert feed.changed() is False       # opening the log commits nothing new
            await log.append(ev.decode_command(msgspec.json.encode(
                {"command_id": "late", "events": [_received(1, 4)]})))
            assert feed.changed() is True and feed.last_seq() == 2
            assert feed.changed() is False
        finally:
            await log.close()
        assert feed.store_id() == "store-1"
    finally:
        feed.close()
