"""The hub refuses, counts and acknowledges what it will not store; its log and table stay bounded."""

import asyncio
import logging
import sqlite3

import pytest

from sync import protocol
from sync.hub.refusal import RefusalLog
from sync.hub.store import HubStore, Rejection
from tests.sync.helpers import PREFIX, STORE, AckWatcher, batch, body, eventually, mqtt_client
from tests.sync.hubproc import HubProcess

EVENTS = protocol.events_topic(PREFIX, STORE)
OTHER = "store-0043"


@pytest.fixture
async def sender(broker):
    client = mqtt_client(broker, "test-store")
    await client.start()
    await client.wait_subscribed(10)
    yield client
    await client.stop()


async def publish(client, topic: str, payload: bytes) -> None:
    await asyncio.wait_for(client.publish(topic, payload), 10)


async def test_duplicate_keys_are_refused_counted_and_acked(tmp_path, broker, sender):
    dup_seq = body(2).replace(b'"qty":1', b'"qty":1,"qty":1000', 1)
    dup_envelope = batch(1, 2).replace(b'"first_seq":1', b'"first_seq":1,"first_seq":1', 1)
    with HubProcess(tmp_path / "hub", broker, stores=(STORE,)) as hub:
        async with AckWatcher(broker) as acks:
            await publish(sender, EVENTS, protocol.encode_batch(STORE, 1, 2, [body(1), dup_seq]))
            await publish(sender, EVENTS, dup_envelope)
            await eventually(lambda: hub.stats()["rejected"].get("duplicate_key") == 2, what="2 duplicate_key")
            await publish(sender, EVENTS, batch(1, 2))
            await eventually(lambda: acks.last == 2, what="the ack for the valid batch behind them")
        assert [e["qty"] for e in hub.export()] == [1, 1]
        assert "events[1].qty appears twice" in hub.output()


async def test_seqs_far_beyond_the_ack_are_refused_and_the_current_ack_restated(tmp_path, broker, sender):
    with HubProcess(tmp_path / "hub", broker, stores=(STORE,), extra="[ingest]\nmax_ahead = 10\n") as hub:
        async with AckWatcher(broker) as acks:
            await publish(sender, EVENTS, batch(1, 3))
            await eventually(lambda: acks.last == 3, what="ack 3")
            before = len(acks.seen)
            await publish(sender, EVENTS, batch(14, 14))          # 14 > 3 + 10: a planted event
            await eventually(lambda: len(acks.seen) > before, what="the restated ack")
            assert acks.seen[before:] == [3]
            assert hub.stats()["rejected"] == {"too_far_ahead": 1}
            await publish(sender, EVENTS, batch(5, 13))           # 13 = 3 + 10: inside the window, after a gap
            await publish(sender, EVENTS, batch(4, 4))
            await eventually(lambda: acks.last == 13, what="ack 13 once the gap filled")
        assert [e["seq"] for e in hub.export()] == list(range(1, 14))
        assert "too_far_ahead" in hub.output() and "ingest.max_ahead 10" in hub.output()


async def test_a_flood_of_refusals_logs_one_warning_per_store_and_reason(tmp_path, broker, sender):
    with HubProcess(tmp_path / "hub", broker, stores=(STORE, OTHER)) as hub:
        for i in range(30):
            await publish(sender, EVENTS, b"not json %d" % i)
        await publish(sender, protocol.events_topic(PREFIX, OTHER), b"not json either")
        await publish(sender, EVENTS, batch(1, 1, OTHER))          # store mismatch: another reason
        await eventually(lambda: sum(hub.stats()["rejected"].values()) == 32, what="32 rejections")
        lines = [line for line in hub.output().splitlines() if "refused a message" in line]
        assert len([line for line in lines if f"{STORE}/events (undecodable)" in line]) == 1, lines
        assert len([line for line in lines if f"{OTHER}/events (undecodable)" in line]) == 1, lines
        assert len([line for line in lines if "(store_mismatch)" in line]) == 1, lines
        assert hub.stats()["rejected"] == {"undecodable": 31, "store_mismatch": 1}


def test_refusal_log_says_how_many_it_left_out():
    now = [100.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test.refusals")
    logger.addHandler(Collect())
    logger.propagate = False
    refusals = RefusalLog(logger, interval_s=60, monotonic=lambda: now[0])
    assert refusals.refused("s1", "undecodable", "t", "bad")
    assert [refusals.refused("s1", "undecodable", "t", "bad") for _ in range(5)] == [False] * 5
    assert refusals.refused("s1", "store_mismatch", "t", "other reason")
    assert refusals.refused("s2", "undecodable", "t", "other store")
    now[0] += 59.9
    assert not refusals.refused("s1", "undecodable", "t", "bad")
    now[0] += 0.2
    assert refusals.refused("s1", "undecodable", "t", "bad again")
    assert len(records) == 4
    assert "6 more refused" in records[-1] and "bad again" in records[-1]
    assert "more refused" not in records[0]


async def test_rejections_table_keeps_the_newest_rows_and_counts_them_all(tmp_path):
    store = await HubStore.open(tmp_path / "hub.db", [STORE], rejections_kept=5)
    try:
        for group in range(4):
            await store.write([Rejection(EVENTS, STORE, "undecodable", f"bad {group}-{i}") for i in range(4)]
                              + [Rejection(EVENTS, STORE, "duplicate_key", f"dup {group}")], "2026-11-27T10:00:00.000Z")
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "hub.db")
    details = [d for (d,) in conn.execute("SELECT detail FROM rejections ORDER BY id")]
    counts = dict(conn.execute("SELECT reason, count FROM rejection_counts"))
    conn.close()
    assert details == ["dup 2", "bad 3-0", "bad 3-1", "bad 3-2", "bad 3-3", "dup 3"][-5:]
    assert counts == {"undecodable": 16, "duplicate_key": 4}

    # Reopened: the counts stay, the cap holds.
    store = await HubStore.open(tmp_path / "hub.db", [STORE], rejections_kept=5)
    try:
        await store.write([Rejection(EVENTS, STORE, "undecodable", "bad late")], "2026-11-27T10:00:01.000Z")
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "hub.db")
    assert conn.execute("SELECT COUNT(*), MAX(detail = 'bad late') FROM rejections").fetchone() == (5, 1)
    assert dict(conn.execute("SELECT reason, count FROM rejection_counts")) == {"undecodable": 17, "duplicate_key": 4}
    conn.close()


async def test_counts_of_a_database_from_before_the_counts_table_are_kept(tmp_path):
    path = tmp_path / "hub.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE rejections (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL,"
                       " topic TEXT NOT NULL, store_id TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL);")
    conn.executemany("INSERT INTO rejections(received_at, topic, store_id, reason, detail) VALUES (?,?,?,?,?)",
                     [("t", EVENTS, STORE, "undecodable", "old")] * 3)
    conn.commit()
    conn.close()
    store = await HubStore.open(path, [STORE])
    await store.close()
    conn = sqlite3.connect(path)
    assert dict(conn.execute("SELECT reason, count FROM rejection_counts")) == {"undecodable": 3}
    conn.close()
