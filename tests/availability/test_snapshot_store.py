"""SnapshotStore and CatalogStore on a real SQLite log, and the downlink's decoding."""

from __future__ import annotations

import asyncio
import sqlite3

import msgspec
import pytest

from agent.log import SqliteEventLog
from agent.snapshots import NearbyStock, SnapshotItem, SnapshotStore, digest_of, rows_of, write_rows
from sync.downlink import Downlink, Malformed, decode_head, rows_from
from sync.mqtt import Message


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


T0 = 1_795_773_600.0  # 2026-11-27T10:00:00Z
T0_TEXT = "2026-11-27T10:00:00.000Z"


def item(sku: str, online: int | None = None, **nearby: int) -> SnapshotItem:
    return SnapshotItem(sku, [NearbyStock(s, n) for s, n in nearby.items()], online)


_opened: list[SnapshotStore] = []


async def open_store(event_log, **kwargs) -> SnapshotStore:
    store = await SnapshotStore.open(event_log, **kwargs)
    _opened.append(store)
    return store


@pytest.fixture
async def log(tmp_path):
    event_log = await SqliteEventLog.open(tmp_path / "events.db", "store-a")
    yield event_log
    while _opened:  # also stops their apply worker processes
        _opened.pop().close()
    await event_log.close()


async def test_answer_pairs_items_with_the_version_of_the_same_snapshot(log):
    store = await open_store(log, max_age_s=60, now=Clock(T0 + 1))
    await store.apply(5, T0_TEXT, [item("SKU-1", 7, **{"store-b": 3})])
    # A newer snapshot commits while the store's cached meta still holds version 5 (the
    # window between an apply's commit and its meta reload).
    rows = rows_of([item("SKU-1", 7, **{"store-b": 0})])
    write_rows(store.path, 6, T0_TEXT, T0_TEXT, rows, digest_of(rows))
    assert store.meta()["version"] == 5
    nearby, online, meta = store.answer("SKU-1")
    assert (nearby, online, meta["version"]) == ([{"store_id": "store-b", "available": 0}], 7, 6)
    assert store.answer("NOPE") == ([], None, meta)


async def test_apply_then_lookup_and_meta(log):
    clock = Clock(T0 + 30)
    store = await open_store(log, max_age_s=60, now=clock)
    assert store.meta() is None
    assert store.lookup("SKU-1") == ([], None)
    outcome = await store.apply(5, T0_TEXT, [item("SKU-1", 7, **{"store-b": 3}), item("SKU-2")])
    assert outcome.applied
    assert store.lookup("SKU-1") == ([{"store_id": "store-b", "available": 3}], 7)
    assert store.lookup("SKU-2") == ([], None)
    assert store.meta() == {"version": 5, "generated_at": T0_TEXT, "age_s": 30.0, "stale": False}
    clock.t = T0 + 61
    assert store.meta()["stale"] is True


async def test_older_or_equal_version_is_ignored(log):
    store = await open_store(log, now=Clock(T0))
    await store.apply(5, T0_TEXT, [item("SKU-1", 1)])
    for version in (5, 4):
        outcome = await store.apply(version, T0_TEXT, [item("SKU-1", 99)])
        assert not outcome.applied and outcome.held_version == 5
    assert store.lookup("SKU-1") == ([], 1)


async def test_new_snapshot_replaces_rows_and_removes_missing_skus(log):
    store = await open_store(log, now=Clock(T0))
    await store.apply(1, T0_TEXT, [item("A", 1), item("B", 2), item("C", 3)])
    outcome = await store.apply(2, T0_TEXT, [item("A", 1), item("B", 20)])
    assert (outcome.changed, outcome.removed) == (1, 1)
    assert [store.lookup(s)[1] for s in "ABC"] == [1, 20, None]


async def test_snapshot_survives_reopen(tmp_path):
    event_log = await SqliteEventLog.open(tmp_path / "events.db", "store-a")
    store = await SnapshotStore.open(event_log, now=Clock(T0))
    await store.apply(3, T0_TEXT, [item("A", 4, **{"store-b": 1})])
    await store.catalog.apply(2, [("A", "Blue mug")])
    store.close()
    await event_log.close()
    event_log = await SqliteEventLog.open(tmp_path / "events.db", "store-a")
    try:
        store = await SnapshotStore.open(event_log, now=Clock(T0))
        assert store.version == 3
        assert store.lookup("A") == ([{"store_id": "store-b", "available": 1}], 4)
        assert store.catalog.version == 2 and store.catalog.name("A") == "Blue mug"
        assert not (await store.apply(3, T0_TEXT, [])).applied
    finally:
        await event_log.close()


async def test_readers_see_previous_snapshot_until_commit(log):
    store = await open_store(log, now=Clock(T0))
    await store.apply(1, T0_TEXT, [item(f"S{i}", 1) for i in range(2000)])
    seen: set[int | None] = set()
    apply = asyncio.create_task(store.apply(2, T0_TEXT, [item(f"S{i}", 2) for i in range(2000)]))
    while not apply.done():
        # Both ends of the table in one read: a half-applied snapshot would show 1 and 2 at once.
        values = {row[0] for row in store._conn.execute(
            "SELECT online FROM availability_items WHERE sku IN ('S0', 'S1999')")}
        assert len(values) == 1
        seen |= values
        await asyncio.sleep(0)
    await apply
    assert 1 in seen  # reads went on (and saw the old snapshot) while the new one was written
    assert store.lookup("S0")[1] == store.lookup("S1999")[1] == 2


async def test_catalog_search_and_version(log):
    store = await open_store(log, now=Clock(T0))
    catalog = store.catalog
    assert await catalog.apply(1, [("MUG-1", "Blue mug"), ("MUG-2", "Red mug"), ("TEA-1", "Green tea 100%")])
    assert [r["sku"] for r in catalog.search("mug")] == ["MUG-1", "MUG-2"]
    assert [r["sku"] for r in catalog.search("tea")] == ["TEA-1"]
    assert catalog.search("100%") == [{"sku": "TEA-1", "name": "Green tea 100%"}]
    assert catalog.search("_") == []
    assert not await catalog.apply(1, [("X", "x")])
    assert catalog.name("MUG-1") == "Blue mug"


def snapshot_payload(store_id="store-a", version=1, items=None, **extra) -> bytes:
    body = {"v": 1, "store_id": store_id, "version": version, "generated_at": T0_TEXT,
            "items": items if items is not None else [{"sku": "A", "nearby": [], "online": None}]}
    body.update(extra)
    return msgspec.json.encode(body)


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "decode"),
    (b"[]", "shape"),
    (snapshot_payload(store_id="store-b"), "store_id"),
    (snapshot_payload(v=2), "shape"),
    (snapshot_payload(version=-1), "shape"),
    (snapshot_payload(generated_at="yesterday"), "shape"),
])
def test_decode_head_refuses_bad_envelopes(payload, reason):
    with pytest.raises(Malformed) as caught:
        decode_head(payload, "store-a")
    assert caught.value.reason == reason


@pytest.mark.parametrize("items", [
    [{"sku": "bad sku", "nearby": [], "online": 1}],
    [{"sku": "A", "nearby": [{"store_id": "store-b", "available": -1}], "online": 1}],
    [{"sku": "A", "nearby": [{"store_id": "store-b", "available": "3"}], "online": 1}],
    [{"sku": "A", "nearby": [], "online": 1.5}],
    [{"sku": "A", "nearby": []}, {"sku": "A", "nearby": []}],
    {"sku": "A"},
])
def test_rows_from_refuses_bad_items(items):
    with pytest.raises(Malformed):
        head = decode_head(snapshot_payload(items=items), "store-a")
        rows_from(head.items, chunk=1)


async def test_downlink_drops_malformed_and_keeps_previous(log):
    store = await open_store(log, now=Clock(T0))
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", snapshots=store)
    good = [{"sku": "A", "nearby": [{"store_id": "store-b", "available": 2}], "online": 5}]
    await downlink.on_availability(Message("t", snapshot_payload(version=2, items=good), 1, True))
    await downlink.on_availability(Message("t", b"{garbage", 1, True))
    await downlink.on_availability(Message("t", snapshot_payload(version=3, items=[{"sku": "A"}]), 1, True))
    await downlink.on_availability(Message("t", snapshot_payload(version=1, items=[]), 1, True))
    assert downlink.drops == {"decode": 1, "item": 1}
    assert (downlink.applied, downlink.ignored) == (1, 1)
    assert store.version == 2
    assert store.lookup("A") == ([{"store_id": "store-b", "available": 2}], 5)


async def test_downlink_reads_zlib_only_under_its_content_type(log):
    import zlib

    from sync.protocol import ZLIB_JSON
    store = await open_store(log, now=Clock(T0))
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", snapshots=store)
    good = [{"sku": "A", "nearby": [], "online": 5}]
    packed = zlib.compress(snapshot_payload(version=2, items=good))
    await downlink.on_availability(Message("t", packed, 1, True))  # no content type: not JSON
    assert downlink.drops == {"decode": 1} and store.version is None
    await downlink.on_availability(Message("t", packed[:-5], 1, True, content_type=ZLIB_JSON))
    assert downlink.drops == {"decode": 2}
    await downlink.on_availability(Message("t", packed, 1, True, content_type=ZLIB_JSON))
    assert store.version == 2 and store.lookup("A") == ([], 5)
    await downlink.on_availability(Message("t", snapshot_payload(version=3, items=good), 1, True))
    assert store.version == 3  # plain JSON keeps working


async def test_downlink_storage_failure_raises_so_the_message_is_not_acked(log, tmp_path):
    store = await open_store(log, now=Clock(T0))
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", snapshots=store)
    with sqlite3.connect(store.path) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON availability_items BEGIN SELECT RAISE(ABORT, 'full'); END")
    with pytest.raises(Exception):
        await downlink.on_availability(Message("t", snapshot_payload(version=2), 1, True))
    assert store.version is None
