"""Sales caps end to end at the store: a real mosquitto, a real `edge-agent run` (with its sync).

The hub's side is played by publishing the store's retained availability snapshot directly
(paho, as the hub would), so these tests hold the agent to the snapshot item's shape.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

from common.clock import rfc3339
from sync import protocol
from sync.state import SCHEMA_VERSION
from tests.availability.test_processes import PREFIX, publish, store_agent
from tests.sync.helpers import wait_until

WEEK = 7 * 86400


def capped_snapshot(store_id: str, version: int, sku: str, allowance: int, start: float) -> bytes:
    return json.dumps({"v": 1, "store_id": store_id, "version": version, "generated_at": rfc3339(time.time()),
                       "sources": [{"source_id": "supplier-x", "name": "Supplier X", "kind": "supplier",
                                    "lead_time_s": 259200, "updated_at": rfc3339(time.time()), "stale": False,
                                    "stale_after_s": 3600}],
                       "items": [{"sku": sku, "nearby": [], "online": None,
                                  "sources": {"supplier-x": 40},
                                  "cap": {"limit": allowance, "scope": "store", "period": "week",
                                          "period_start": rfc3339(start), "period_end": rfc3339(start + WEEK),
                                          "allowance": allowance}}]}).encode()


def post(agent, *events: dict) -> tuple[int, dict]:
    return agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": list(events)})


def cap_of(agent, sku: str) -> dict | None:
    status, answer = agent.request("GET", f"/v1/availability/{sku}")
    assert status == 200, answer
    return answer["cap"]


def last_seq(agent) -> int:
    return agent.request("GET", "/v1/sync")[1]["last_seq"]


async def test_a_capped_sku_is_refused_409_with_nothing_appended_and_the_cap_holds_offline(tmp_path, broker):
    start = time.time() - 3600
    with store_agent(tmp_path, broker, "store-a") as agent:
        wait_until(lambda: agent.request("GET", "/v1/sync")[1]["connected"], 20, "the agent to connect")
        assert post(agent, {"type": "received", "sku": "CONSOLE", "qty": 10, "location": "floor"})[0] == 201
        await publish(broker, protocol.availability_topic(PREFIX, "store-a"),
                      capped_snapshot("store-a", 5, "CONSOLE", 2, start))
        cap = wait_until(lambda: cap_of(agent, "CONSOLE"), 20, "the cap from the snapshot")
        assert cap == {"limit": 2, "scope": "store", "period": "week", "period_start": rfc3339(start),
                       "period_end": rfc3339(start + WEEK), "allowance": 2, "used": 0, "left": 2}
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 2})[0] == 201
        seq = last_seq(agent)
        status, body = post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 1})
        assert status == 409, body
        assert body["error"]["code"] == "sales_cap_reached" and body["error"]["field"] == "events[0].qty"
        assert body["error"]["sku"] == "CONSOLE" and body["error"]["limit"] == 2 and body["error"]["left"] == 0
        assert body["error"]["message"] == f"CONSOLE: limit 2 per week, 0 left (week from {rfc3339(start)})"
        assert last_seq(agent) == seq
        assert agent.request("GET", "/v1/stock/CONSOLE")[1]["floor"] == 8

        # The broker dies (SIGKILL) and the agent restarts without it: the last allowance holds.
        broker.kill()
        agent.kill()
        agent.start()
        # (The killed sync's last status says connected until the new one reports.)
        wait_until(lambda: not agent.request("GET", "/v1/sync")[1]["connected"], 20, "sync to report no broker")
        status, body = post(agent, {"type": "reserved", "sku": "CONSOLE", "qty": 1, "reservation_id": "r-1"})
        assert status == 409 and body["error"]["code"] == "sales_cap_reached", body
        assert last_seq(agent) == seq
        assert cap_of(agent, "CONSOLE")["used"] == 2
        # Other SKUs still sell.
        assert post(agent, {"type": "sold", "sku": "MUG", "qty": 1})[0] == 201


async def test_a_new_snapshot_raising_the_allowance_lets_the_next_sale_through(tmp_path, broker):
    start = time.time() - 3600
    topic = protocol.availability_topic(PREFIX, "store-a")
    with store_agent(tmp_path, broker, "store-a") as agent:
        await publish(broker, topic, capped_snapshot("store-a", 1, "CONSOLE", 1, start))
        wait_until(lambda: cap_of(agent, "CONSOLE"), 20, "the cap from the snapshot")
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 1})[0] == 201
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 1})[0] == 409
        await publish(broker, topic, capped_snapshot("store-a", 2, "CONSOLE", 3, start))
        wait_until(lambda: (cap_of(agent, "CONSOLE") or {}).get("allowance") == 3, 20, "the raised allowance")
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 2})[0] == 201
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 1})[0] == 409
        # A snapshot without a cap for the SKU lifts it.
        await publish(broker, topic, json.dumps({"v": 1, "store_id": "store-a", "version": 3,
                                                 "generated_at": rfc3339(time.time()),
                                                 "items": [{"sku": "CONSOLE", "nearby": []}]}).encode())
        wait_until(lambda: cap_of(agent, "CONSOLE") is None, 20, "the cap lifted")
        assert post(agent, {"type": "sold", "sku": "CONSOLE", "qty": 1})[0] == 201


async def test_a_malformed_cap_is_a_counted_drop_and_the_held_cap_stays(tmp_path, broker):
    start = time.time() - 3600
    topic = protocol.availability_topic(PREFIX, "store-a")
    with store_agent(tmp_path, broker, "store-a") as agent:
        await publish(broker, topic, capped_snapshot("store-a", 1, "CONSOLE", 1, start))
        wait_until(lambda: cap_of(agent, "CONSOLE"), 20, "the cap from the snapshot")
        bad = json.loads(capped_snapshot("store-a", 2, "CONSOLE", 5, start))
        bad["items"][0]["cap"]["period"] = "fortnight"
        await publish(broker, topic, json.dumps(bad).encode())
        counters = wait_until(lambda: (lambda c: c if c.get("dropped_cap") else None)(
            agent.request("GET", "/v1/sync")[1]["counters"]), 20, "the drop counted")
        assert counters["dropped_cap"] == 1
        # The drop's log line names the field (the counter can be read before the line is).
        wait_until(lambda: "cap.period" in agent.output(), 10, "the drop's log line naming cap.period")
        assert cap_of(agent, "CONSOLE")["allowance"] == 1


def test_a_sync_database_of_schema_1_is_migrated_and_read(tmp_path):
    """An older sync.db: the agent's view reads it (no caps); the sync process migrates it to 3."""
    import asyncio

    from agent.syncview import SqliteSyncView
    from sync.state import SqliteSyncState

    path = tmp_path / "events.sync.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE availability_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
            generated_at TEXT NOT NULL, applied_at TEXT NOT NULL, digest BLOB NOT NULL, items INTEGER NOT NULL);
        CREATE TABLE availability_items (sku TEXT PRIMARY KEY, item BLOB NOT NULL, online INTEGER) WITHOUT ROWID;
        INSERT INTO meta VALUES ('store_id', 'store-a'), ('schema', '1');
        INSERT INTO availability_snapshot VALUES (1, 4, '2026-11-27T13:00:00.000Z', '2026-11-27T13:00:01.000Z', x'00', 1);
        INSERT INTO availability_items VALUES ('A1', '{"sku":"A1","nearby":[],"online":3}', 3);
    """)
    conn.commit()
    conn.close()
    view = SqliteSyncView(path)
    assert view.item("A1")["online"] == 3 and view.item("A1")["cap"] is None and view.caps({"A1"}) == {}

    async def migrate() -> None:
        state = await SqliteSyncState.open(path, "store-a")
        await state.close()

    asyncio.run(migrate())
    # The same open view sees the migrated file: the held snapshot (no sources, no cap) was kept.
    assert view.item("A1")["online"] == 3 and view.item("A1")["snapshot"]["version"] == 4
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SCHEMA_VERSION,)
    view.close()


_V2_SOURCE = {"source_id": "supplier-x", "name": "Supplier X", "kind": "supplier", "available": 40,
              "lead_time_s": 259200, "updated_at": "2026-11-27T12:00:00.000Z", "stale": False, "stale_after_s": 3600}


def _schema_2_file(path, item: dict) -> None:
    """A sync.db as schema "2" wrote it: no sources table, each item's sources whole."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE availability_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
            generated_at TEXT NOT NULL, applied_at TEXT NOT NULL, digest BLOB NOT NULL, items INTEGER NOT NULL);
        CREATE TABLE availability_items (sku TEXT PRIMARY KEY, item BLOB NOT NULL, online INTEGER, cap BLOB)
            WITHOUT ROWID;
        INSERT INTO meta VALUES ('store_id', 'store-a'), ('schema', '2');
        INSERT INTO availability_snapshot VALUES (1, 4, '2026-11-27T13:00:00.000Z', '2026-11-27T13:00:01.000Z', x'00', 1);
    """)
    conn.execute("INSERT INTO availability_items VALUES (?, ?, 3, NULL)", (item["sku"], json.dumps(item)))
    conn.commit()
    conn.close()


def test_a_sync_database_of_schema_2_is_read_then_migrated_to_the_sources_table(tmp_path):
    """A "2" file: the agent reads its items' whole source entries; the sync process migrates it
    to the current schema, dropping a held snapshot in the old item shape (the hub's retained one comes back)."""
    import asyncio

    from agent.syncview import SqliteSyncView
    from sync.state import SqliteSyncState

    old = tmp_path / "old.sync.db"
    _schema_2_file(old, {"sku": "A1", "nearby": [], "online": 3, "sources": [_V2_SOURCE]})
    plain = tmp_path / "plain.sync.db"
    _schema_2_file(plain, {"sku": "A1", "nearby": [], "online": 3})
    view, plain_view = SqliteSyncView(old), SqliteSyncView(plain)
    assert view.item("A1")["sources"] == [_V2_SOURCE]

    async def migrate(path) -> None:
        state = await SqliteSyncState.open(path, "store-a")
        await state.close()

    asyncio.run(migrate(old))
    asyncio.run(migrate(plain))
    assert view.item("A1") == {"nearby": [], "online": None, "sources": [], "cap": None, "snapshot": None}
    assert plain_view.item("A1")["online"] == 3 and plain_view.item("A1")["snapshot"]["version"] == 4
    for path in (old, plain):
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT COUNT(*) FROM availability_sources").fetchone() == (0,)
        conn.close()
    view.close()
    plain_view.close()


def _raw(item: dict):
    import msgspec

    return msgspec.Raw(json.dumps(item).encode())


def _item(**fields) -> dict:
    item = json.loads(capped_snapshot("store-a", 1, "CONSOLE", 2, 1_796_000_000))["items"][0]
    item.update(fields)
    return item


def test_the_downlink_stores_a_valid_cap_and_reads_old_items_as_uncapped():
    from sync.downlink import rows_from

    (sku, raw, _, cap), (old_sku, _, _, old_cap) = rows_from(
        [_raw(_item()), _raw({"sku": "OLD", "nearby": [], "online": 3})], source_ids={"supplier-x"})[0]
    assert sku == "CONSOLE" and json.loads(cap)["allowance"] == 2
    assert json.loads(bytes(raw))["sources"] == {"supplier-x": 40}
    assert old_sku == "OLD" and old_cap is None
    assert rows_from([_raw(_item(cap=None, sources={}))])[0][0][3] is None


def test_a_malformed_source_or_cap_drops_the_snapshot_naming_the_field():
    import pytest

    from sync.downlink import Malformed, decode_head, rows_from

    good = _item()
    ids = {"supplier-x"}
    cases = [
        ("sources", {"sources": {"supplier-x": -1}}, "sources"),
        ("sources", {"sources": {"supplier-x": "40"}}, "sources"),
        ("sources", {"sources": {"supplier-y": 1}}, "sources.supplier-y is not in the snapshot's sources table"),
        ("sources", {"sources": {"bad id!": 1}}, "sources"),
        ("sources", {"sources": [{"source_id": "supplier-x", "available": 40}]}, "sources"),
        ("cap", {"cap": dict(good["cap"], period="fortnight")}, "cap.period"),
        ("cap", {"cap": dict(good["cap"], allowance="2")}, "cap.allowance"),
        ("cap", {"cap": dict(good["cap"], period_end=good["cap"]["period_start"])}, "period_end"),
        ("cap", {"cap": {k: v for k, v in good["cap"].items() if k != "limit"}}, "limit"),
    ]
    for reason, change, named in cases:
        with pytest.raises(Malformed) as bad:
            rows_from([_raw({"sku": "OK", "nearby": []}), _raw(dict(good, **change))], source_ids=ids)
        assert bad.value.reason == reason and named in str(bad.value), (change, str(bad.value))
    # The snapshot's sources table, field by field.
    snapshot = json.loads(capped_snapshot("store-a", 1, "CONSOLE", 2, 1_796_000_000))
    entry = snapshot["sources"][0]
    table_cases = [
        (dict(entry, kind="shop"), "sources[0].kind"),
        (dict(entry, lead_time_s=-1), "sources[0].lead_time_s"),
        (dict(entry, updated_at="2026-02-30T00:00:00Z"), "sources[0].updated_at"),
        (dict(entry, stale="no"), "sources[0].stale"),
        ({k: v for k, v in entry.items() if k != "stale_after_s"}, "stale_after_s"),
        (dict(entry, name=""), "sources[0].name"),
    ]
    for changed, named in table_cases:
        with pytest.raises(Malformed) as bad:
            decode_head(json.dumps(dict(snapshot, sources=[changed])).encode(), "store-a")
        assert bad.value.reason == "sources" and named in str(bad.value), (changed, str(bad.value))
    with pytest.raises(Malformed) as bad:
        decode_head(json.dumps(dict(snapshot, sources=[entry, entry])).encode(), "store-a")
    assert bad.value.reason == "sources" and "listed twice" in str(bad.value)
