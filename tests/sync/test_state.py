"""sync.db on real SQLite files: the sync process writes (SqliteSyncState), the agent reads (SqliteSyncView).

One contract suite per role: every `SyncState` implementation (the SQLite one, and the
in-memory one the uplink's shell tests use) keeps the cursor, the snapshot and the catalog
by the same rules; the agent's read-only view sees exactly what the writer committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import zlib

import msgspec
import pytest

from agent.syncview import SqliteSyncView
from common.errors import StorageError
from sync.downlink import Downlink, Malformed, decode_head, digest_of, rows_from
from sync.mqtt import Message
from sync.ports import UplinkStatus
from sync.protocol import ZLIB_JSON
from sync.state import SqliteSyncState


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


T0 = 1_795_773_600.0  # 2026-11-27T10:00:00Z
T0_TEXT = "2026-11-27T10:00:00.000Z"


def rows(*items: tuple) -> list:
    """Rows for (sku, online, {store: available}) items, as the downlink stores them."""
    out = []
    for sku, online, nearby in items:
        body = {"sku": sku, "nearby": [{"store_id": s, "available": n} for s, n in nearby.items()], "online": online}
        out.append((sku, msgspec.json.encode(body), online))
    return out


@pytest.fixture
async def state(tmp_path):
    opened = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a", now=Clock(T0))
    yield opened
    await opened.close()


@pytest.fixture
def view(tmp_path):
    reader = SqliteSyncView(tmp_path / "events.sync.db", max_age_s=60, now=Clock(T0 + 30))
    yield reader
    reader.close()


async def apply(state, version: int, *items: tuple):
    r = rows(*items)
    return await state.apply_snapshot(version, T0_TEXT, r, digest_of(r))


# ------------------------------------------------------------------ the view before sync ran


def test_view_answers_nothing_held_before_sync_ever_ran(tmp_path):
    view = SqliteSyncView(tmp_path / "never.sync.db")
    status = view.status()
    assert (status["acked_seq"], status["connected"], status["beat_age_s"]) == (0, False, None)
    assert view.answer("A") == ([], None, None) and view.snapshot_meta() is None
    assert view.search("mug") == [] and view.name("A") is None


# ------------------------------------------------------------------------- cursor, status


async def test_the_ack_mark_is_kept_with_the_cursor(tmp_path, state):
    assert await state.ack_mark() == (None, None)
    await state.store_cursor(12, T0_TEXT, mark=("e1", 7))
    await state.close()
    again = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a")
    try:
        assert (await again.cursor(), await again.ack_mark()) == ((12, T0_TEXT), ("e1", 7))
        await again.store_cursor(13, T0_TEXT)        # an older hub's ack clears the mark
        assert await again.ack_mark() == (None, None)
    finally:
        await again.close()


async def test_a_schema_3_file_gains_the_ack_mark_and_keeps_its_cursor(tmp_path):
    path = tmp_path / "old.sync.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE cursor (id INTEGER PRIMARY KEY CHECK (id = 1), acked_seq INTEGER NOT NULL,
                             last_ack_at TEXT);
        INSERT INTO meta VALUES ('store_id', 'store-a'), ('schema', '3');
        INSERT INTO cursor VALUES (1, 40, '2026-01-01T00:00:00Z');
    """)
    conn.commit()
    conn.close()
    state = await SqliteSyncState.open(path, "store-a")
    try:
        assert (await state.cursor(), await state.ack_mark()) == ((40, "2026-01-01T00:00:00Z"), (None, None))
        await state.store_cursor(41, T0_TEXT, mark=("e1", 2))
        assert await state.ack_mark() == ("e1", 2)
    finally:
        await state.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
    conn.close()
    view = SqliteSyncView(path)
    try:
        assert view.status()["acked_seq"] == 41
    finally:
        view.close()


async def test_cursor_and_status_are_durable_and_seen_by_the_view(tmp_path, state, view):
    assert await state.cursor() == (0, None)
    await state.store_cursor(12, T0_TEXT, UplinkStatus(connected=True, sent_seq=20, resends=1))
    assert await state.cursor() == (12, T0_TEXT)
    seen = view.status()
    assert (seen["acked_seq"], seen["last_ack_at"], seen["connected"], seen["sent_seq"], seen["resends"]) == \
        (12, T0_TEXT, True, 20, 1)
    assert seen["beat_age_s"] == 30.0
    await state.close()
    again = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a")
    try:
        assert await again.cursor() == (12, T0_TEXT)
    finally:
        await again.close()


async def test_a_file_of_another_store_is_refused(tmp_path, state):
    with pytest.raises(StorageError, match="belongs to store 'store-a'"):
        await SqliteSyncState.open(tmp_path / "events.sync.db", "store-b")


async def test_counters_add_up_and_survive_reopen(tmp_path, state, view):
    await state.add_counts({"dropped_decode": 1})
    await state.add_counts({"dropped_decode": 2, "snapshots_applied": 1})
    assert view.status()["counters"] == {"dropped_decode": 3, "snapshots_applied": 1}
    await state.close()
    again = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a")
    try:
        await again.add_counts({"snapshots_applied": 1})
        assert view.status()["counters"]["snapshots_applied"] == 2
    finally:
        await again.close()


# ------------------------------------------------------------------------------ snapshots


async def test_apply_then_answer_and_meta(state, view):
    assert view.snapshot_meta() is None
    assert (await apply(state, 5, ("SKU-1", 7, {"store-b": 3}), ("SKU-2", None, {}))).applied
    assert view.answer("SKU-1")[:2] == ([{"store_id": "store-b", "available": 3}], 7)
    assert view.answer("SKU-2")[:2] == ([], None)
    assert view.snapshot_meta() == {"version": 5, "generated_at": T0_TEXT, "age_s": 30.0, "stale": False}
    view._now = Clock(T0 + 61)
    assert view.snapshot_meta()["stale"] is True


async def test_older_or_equal_version_is_ignored(state, view):
    await apply(state, 5, ("SKU-1", 1, {}))
    for version in (5, 4):
        outcome = await apply(state, version, ("SKU-1", 99, {}))
        assert not outcome.applied and outcome.held_version == 5
    assert view.answer("SKU-1")[1] == 1 and state.snapshot_version == 5


async def test_new_snapshot_replaces_rows_and_removes_missing_skus(state, view):
    await apply(state, 1, ("A", 1, {}), ("B", 2, {}), ("C", 3, {}))
    outcome = await apply(state, 2, ("A", 1, {}), ("B", 20, {}))
    assert (outcome.changed, outcome.removed) == (1, 1)
    assert [view.answer(s)[1] for s in "ABC"] == [1, 20, None]


async def test_an_apply_writes_only_the_rows_that_changed(tmp_path, state, view):
    await apply(state, 1, ("A", 1, {}), ("B", 2, {}), ("C", 3, {}))
    spy = sqlite3.connect(tmp_path / "events.sync.db", isolation_level=None)
    spy.executescript("""CREATE TABLE written (sku TEXT);
        CREATE TRIGGER on_update AFTER UPDATE ON availability_items BEGIN INSERT INTO written VALUES (new.sku); END;
        CREATE TRIGGER on_insert AFTER INSERT ON availability_items BEGIN INSERT INTO written VALUES (new.sku); END;""")
    outcome = await apply(state, 2, ("A", 1, {}), ("B", 20, {}), ("C", 3, {}), ("D", 4, {}))
    assert (outcome.changed, outcome.removed) == (2, 0)
    assert sorted(r[0] for r in spy.execute("SELECT sku FROM written")) == ["B", "D"]
    assert [view.answer(s)[1] for s in "ABCD"] == [1, 20, 3, 4]
    spy.close()


async def test_the_sources_table_is_stored_once_and_joined_with_each_items_quantities(tmp_path, state, view):
    table = [(0, "wh-1", "Central", "warehouse", 86400, "2026-11-27T12:59:00.000Z", 0, 3600),
             (1, "sup-x", "Supplier X", "supplier", 259200, "2026-11-27T12:00:00.000Z", 1, 1800)]
    items = [("A", msgspec.json.encode({"sku": "A", "nearby": [], "online": 7, "sources": {"wh-1": 7, "sup-x": 40}}), 7),
             ("B", msgspec.json.encode({"sku": "B", "nearby": [], "online": None, "sources": {"sup-x": 2}}), None)]
    assert (await state.apply_snapshot(1, T0_TEXT, items, digest_of(items), sources=table)).applied
    assert view.item("A")["sources"] == [
        {"source_id": "wh-1", "name": "Central", "kind": "warehouse", "available": 7, "lead_time_s": 86400,
         "updated_at": "2026-11-27T12:59:00.000Z", "stale": False, "stale_after_s": 3600},
        {"source_id": "sup-x", "name": "Supplier X", "kind": "supplier", "available": 40, "lead_time_s": 259200,
         "updated_at": "2026-11-27T12:00:00.000Z", "stale": True, "stale_after_s": 1800}]
    assert [s["available"] for s in view.item("B")["sources"]] == [2]
    # A newer list from wh-1 moves its time in the table alone: the items are not written again.
    moved = [(0, "wh-1", "Central", "warehouse", 86400, "2026-11-27T13:00:00.000Z", 0, 3600), table[1]]
    outcome = await state.apply_snapshot(2, T0_TEXT, items, digest_of(items), sources=moved)
    assert outcome.applied and outcome.changed == 0
    assert view.item("A")["sources"][0]["updated_at"] == "2026-11-27T13:00:00.000Z"
    # A snapshot from an old hub (no table, no sources) empties it.
    assert (await apply(state, 3, ("A", 1, {}))).applied
    assert view.item("A")["sources"] == []
    conn = sqlite3.connect(tmp_path / "events.sync.db")
    assert conn.execute("SELECT COUNT(*) FROM availability_sources").fetchone() == (0,)
    conn.close()


async def test_snapshot_and_catalog_survive_reopen(tmp_path, state, view):
    await apply(state, 3, ("A", 4, {"store-b": 1}))
    await state.apply_catalog(2, [("A", "Blue mug")])
    await state.close()
    again = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a")
    try:
        assert (again.snapshot_version, again.catalog_version) == (3, 2)
        assert not (await apply(again, 3)).applied
        assert view.name("A") == "Blue mug"
    finally:
        await again.close()


async def test_the_view_sees_the_previous_snapshot_until_the_new_one_commits(state, view):
    await apply(state, 1, *[(f"S{i}", 1, {}) for i in range(3000)])
    seen: set = set()
    task = asyncio.create_task(apply(state, 2, *[(f"S{i}", 2, {}) for i in range(3000)]))
    while not task.done():
        for sku in ("S0", "S2999"):   # each answer pairs an item with its own snapshot's version
            _, online, meta = view.answer(sku)
            seen.add((online, meta["version"]))
        await asyncio.sleep(0)
    await task
    assert view.answer("S0")[1] == view.answer("S2999")[1] == 2
    assert (1, 1) in seen   # reads went on, and saw the old snapshot, while the new one was written
    assert all(online == version for online, version in seen), seen


async def test_catalog_search_and_version(state, view):
    assert await state.apply_catalog(1, [("MUG-1", "Blue mug"), ("MUG-2", "Red mug"), ("TEA-1", "Green tea 100%")])
    assert [r["sku"] for r in view.search("mug")] == ["MUG-1", "MUG-2"]
    assert view.search("100%") == [{"sku": "TEA-1", "name": "Green tea 100%"}]
    assert view.search("_") == []
    assert not await state.apply_catalog(1, [("X", "x")])
    assert view.name("MUG-1") == "Blue mug"


# ------------------------------------------------------------------------------- downlink


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


async def test_downlink_drops_malformed_and_keeps_previous(state, view):
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", state=state)
    good = [{"sku": "A", "nearby": [{"store_id": "store-b", "available": 2}], "online": 5}]
    await downlink.on_availability(Message("t", snapshot_payload(version=2, items=good), 1, True))
    await downlink.on_availability(Message("t", b"{garbage", 1, True))
    await downlink.on_availability(Message("t", snapshot_payload(version=3, items=[{"sku": "A"}]), 1, True))
    await downlink.on_availability(Message("t", snapshot_payload(version=1, items=[]), 1, True))
    assert downlink.drops == {"decode": 1, "item": 1}
    assert (downlink.applied, downlink.ignored) == (1, 1)
    assert view.answer("A")[:2] == ([{"store_id": "store-b", "available": 2}], 5)
    assert view.status()["counters"] == {"snapshots_applied": 1, "dropped_decode": 1, "dropped_item": 1,
                                         "snapshots_ignored": 1}


async def test_downlink_applies_the_sources_table_and_drops_a_bad_one_naming_the_field(state, view):
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", state=state)
    table = [{"source_id": "sup-x", "name": "Supplier X", "kind": "supplier", "lead_time_s": 3600,
              "updated_at": T0_TEXT, "stale": False, "stale_after_s": 600}]
    items = [{"sku": "A", "nearby": [], "online": None, "sources": {"sup-x": 4}}]
    await downlink.on_availability(Message("t", snapshot_payload(version=2, items=items, sources=table), 1, True))
    assert [(s["source_id"], s["available"], s["name"]) for s in view.item("A")["sources"]] == [("sup-x", 4, "Supplier X")]
    bad_kind = [dict(table[0], kind="shop")]
    await downlink.on_availability(Message("t", snapshot_payload(version=3, items=items, sources=bad_kind), 1, True))
    unknown = [{"sku": "A", "nearby": [], "sources": {"sup-y": 4}}]
    await downlink.on_availability(Message("t", snapshot_payload(version=4, items=unknown, sources=table), 1, True))
    no_table = snapshot_payload(version=5, items=items)   # quantities of sources it never describes
    await downlink.on_availability(Message("t", no_table, 1, True))
    assert downlink.drops == {"sources": 3} and downlink.applied == 1
    assert view.item("A")["snapshot"]["version"] == 2 and view.item("A")["sources"][0]["available"] == 4
    assert view.status()["counters"]["dropped_sources"] == 3


async def test_downlink_reads_zlib_only_under_its_content_type(state):
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", state=state)
    packed = zlib.compress(snapshot_payload(version=2, items=[{"sku": "A", "nearby": [], "online": 5}]))
    await downlink.on_availability(Message("t", packed, 1, True))  # no content type: not JSON
    assert downlink.drops == {"decode": 1} and state.snapshot_version is None
    await downlink.on_availability(Message("t", packed[:-5], 1, True, content_type=ZLIB_JSON))
    assert downlink.drops == {"decode": 2}
    await downlink.on_availability(Message("t", packed, 1, True, content_type=ZLIB_JSON))
    assert state.snapshot_version == 2
    await downlink.on_availability(Message("t", snapshot_payload(version=3), 1, True))
    assert state.snapshot_version == 3  # plain JSON keeps working


async def test_downlink_storage_failure_raises_so_the_message_is_not_acked(state):
    downlink = Downlink(mqtt=None, prefix="retail", store_id="store-a", state=state)
    with sqlite3.connect(state.path) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON availability_items BEGIN SELECT RAISE(ABORT, 'full'); END")
    with pytest.raises(StorageError):
        await downlink.on_availability(Message("t", snapshot_payload(version=2), 1, True))
    assert state.snapshot_version is None


async def test_close_waits_for_a_statement_whose_caller_was_cancelled(tmp_path):
    """A cancelled caller leaves its thread running on the connection: close() must wait for it."""
    import threading
    import time

    state = await SqliteSyncState.open(tmp_path / "cancel.sync.db", "store-1")
    started, finished = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> int:
        started.set()
        time.sleep(0.3)
        value = conn.execute("SELECT 1").fetchone()[0]   # would fail on a closed connection
        finished.set()
        return value

    caller = asyncio.create_task(state._run(slow))
    await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await state.close()
    assert finished.is_set(), "the connection was closed while a statement was still running on it"
