"""The uplink's batches, cut and joined inside SQLite, against the cut done in Python."""

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent.log import SqliteEventLog
from agent.reader import LogReader


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
    yield reader, reader.events_after(0, 1000)
    reader.close()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(after=st.integers(0, 61), max_events=st.integers(1, 70), max_bytes=st.integers(1, 8_000))
def test_joined_batch_is_the_python_cut(varied_log, after, max_events, max_bytes):
    reader, rows = varied_log
    assert reader.joined_batch(after, max_events, max_bytes) == _python_cut(rows, after, max_events, max_bytes)


def test_an_event_larger_than_the_byte_cap_goes_alone(varied_log):
    reader, rows = varied_log
    last, count, joined = reader.joined_batch(0, 500, 10)
    assert (last, count, joined) == (1, 1, rows[0][1])


def test_joined_bodies_decode_in_seq_order(varied_log):
    reader, _ = varied_log
    last, count, joined = reader.joined_batch(10, 25, 1_000_000)
    seqs = [e["seq"] for e in msgspec.json.decode(b"[" + joined + b"]")]
    assert (last, count, seqs) == (35, 25, list(range(11, 36)))


async def test_events_at_an_older_schema_take_the_upcasting_path(tmp_path, monkeypatch):
    path = tmp_path / "events.db"
    await _log_with(path, [3, 5, 8])
    monkeypatch.setattr(ev, "CURRENT_SCHEMA", 2)  # every stored event (schema 1) is now older
    upcast = []
    monkeypatch.setattr("agent.reader.current_body",
                        lambda schema, body: upcast.append(schema) or body.replace(b'"schema":1', b'"schema":2'))
    reader = LogReader(path)
    try:
        last, count, joined = reader.joined_batch(0, 10, 1_000_000)
    finally:
        reader.close()
    assert (last, count, upcast) == (3, 3, [1, 1, 1])
    assert [e["schema"] for e in msgspec.json.decode(b"[" + joined + b"]")] == [2, 2, 2]


def test_nothing_after_the_end_is_none(varied_log):
    reader, _ = varied_log
    assert reader.joined_batch(60, 10, 1000) is None
