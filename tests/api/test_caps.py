"""Sales caps through the API of an in-process agent, with a cap the sync process stored in sync.db."""

from __future__ import annotations

import time

import msgspec

from agent.settings import sync_db_path
from common.clock import rfc3339
from sync.downlink import rows_from
from sync.state import SqliteSyncState
from tests.api.conftest import STORE


def cap_item(sku: str, allowance: int, start: float, days: float = 7, limit: int | None = None) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode({
        "sku": sku, "nearby": [], "online": None, "sources": {"supplier-x": 40},
        "cap": {"limit": allowance if limit is None else limit, "scope": "store", "period": "week",
                "period_start": rfc3339(start), "period_end": rfc3339(start + days * 86400),
                "allowance": allowance}}))


def source_table() -> list[tuple]:
    """The snapshot's sources table (downlink.table_rows): the supplier, last heard of two hours ago."""
    return [(0, "supplier-x", "Supplier X", "supplier", 259200, rfc3339(time.time() - 7200), 0, 3600)]


async def store_snapshot(agent, version: int, *items: msgspec.Raw) -> None:
    rows, digest = rows_from(list(items), source_ids={"supplier-x"})
    state = await SqliteSyncState.open(sync_db_path(agent.ctx.config), STORE)
    try:
        assert (await state.apply_snapshot(version, rfc3339(time.time()), rows, digest,
                                           sources=source_table())).applied
    finally:
        await state.close()


def command(cid: str, *events: dict) -> dict:
    return {"command_id": cid, "events": list(events)}


async def test_a_sale_past_the_allowance_is_refused_409_and_appends_nothing(start_agent):
    agent = await start_agent()
    start = time.time() - 3600
    await store_snapshot(agent, 1, cap_item("CONSOLE", 2, start))
    assert (await agent.post(command("c0", {"type": "received", "sku": "CONSOLE", "qty": 10})))[0] == 201
    assert (await agent.post(command("c1", {"type": "sold", "sku": "CONSOLE", "qty": 1})))[0] == 201
    before = agent.last_seq
    # Two intents of one SKU are summed: 1 + 1 on top of 1 used passes the allowance of 2.
    status, body = await agent.post(command("c2", {"type": "sold", "sku": "CONSOLE", "qty": 1},
                                            {"type": "reserved", "sku": "CONSOLE", "qty": 1, "reservation_id": "r1"}))
    assert status == 409, body
    error = body["error"]
    assert error["code"] == "sales_cap_reached" and error["field"] == "events[1].qty"
    assert error["sku"] == "CONSOLE" and error["limit"] == 2 and error["period"] == "week" and error["left"] == 1
    assert error["period_start"] == rfc3339(start)
    assert error["message"] == f"CONSOLE: limit 2 per week, 1 left (week from {rfc3339(start)})"
    assert agent.last_seq == before
    assert (await agent.get("/v1/stock/CONSOLE"))[1]["available"] == 9   # the refused command left the stock as it was
    status, answer = await agent.get("/v1/availability/CONSOLE")
    assert answer["cap"] == {"limit": 2, "scope": "store", "period": "week", "period_start": rfc3339(start),
                             "period_end": rfc3339(start + 7 * 86400), "allowance": 2, "used": 1, "left": 1}
    # The last unit still sells; then nothing more does, by sale or by reservation.
    assert (await agent.post(command("c3", {"type": "reserved", "sku": "CONSOLE", "qty": 1,
                                            "reservation_id": "r1"})))[0] == 201
    for cid, intent in (("c4", {"type": "sold", "sku": "CONSOLE", "qty": 1}),
                        ("c5", {"type": "reserved", "sku": "CONSOLE", "qty": 1, "reservation_id": "r2"})):
        status, body = await agent.post(command(cid, intent))
        assert status == 409 and body["error"]["code"] == "sales_cap_reached" and body["error"]["left"] == 0
    # Releasing the reservation made in this period gives its unit back.
    assert (await agent.post(command("c6", {"type": "reservation_released", "reservation_id": "r1"})))[0] == 201
    assert (await agent.get("/v1/availability/CONSOLE"))[1]["cap"]["left"] == 1
    assert (await agent.post(command("c7", {"type": "sold", "sku": "CONSOLE", "qty": 1})))[0] == 201
    assert (await agent.get("/v1/availability/CONSOLE"))[1]["cap"]["left"] == 0
    # Other SKUs and other event types are not capped.
    assert (await agent.post(command("c8", {"type": "sold", "sku": "MUG", "qty": 5},
                                     {"type": "received", "sku": "CONSOLE", "qty": 3})))[0] == 201


async def test_the_answer_lists_sources_with_the_agents_age_and_staleness(start_agent):
    agent = await start_agent()
    await store_snapshot(agent, 1, cap_item("CONSOLE", 2, time.time() - 3600))
    status, answer = await agent.get("/v1/availability/CONSOLE")
    assert status == 200
    [source] = answer["sources"]
    # The item's quantity joined with the snapshot's sources table: the answer's whole entry.
    assert list(source) == ["source_id", "name", "kind", "available", "lead_time_s", "updated_at", "stale",
                            "stale_after_s", "age_s"]
    assert source["source_id"] == "supplier-x" and source["available"] == 40 and source["lead_time_s"] == 259200
    assert source["name"] == "Supplier X" and source["kind"] == "supplier" and source["stale_after_s"] == 3600
    # The hub said fresh, but two hours passed its one-hour stale_after_s by the agent's clock.
    assert 7190 < source["age_s"] < 7300 and source["stale"] is True


async def test_past_period_end_the_period_rolls_forward_with_the_same_allowance(start_agent):
    agent = await start_agent()
    # A one-day period that ended three and a half days ago: the current one began half a day ago.
    start = time.time() - 4.5 * 86400
    await store_snapshot(agent, 1, cap_item("CONSOLE", 1, start, days=1))
    status, answer = await agent.get("/v1/availability/CONSOLE")
    assert answer["cap"]["period_start"] == rfc3339(start + 4 * 86400)
    assert answer["cap"]["left"] == 1
    assert (await agent.post(command("c1", {"type": "sold", "sku": "CONSOLE", "qty": 1})))[0] == 201
    status, body = await agent.post(command("c2", {"type": "sold", "sku": "CONSOLE", "qty": 1}))
    assert status == 409 and body["error"]["period_start"] == rfc3339(start + 4 * 86400)


async def test_without_a_sync_database_no_cap_is_known_and_sales_go_on(start_agent, tmp_path):
    agent = await start_agent()
    assert not (tmp_path / "events.sync.db").exists()
    assert (await agent.post(command("c1", {"type": "sold", "sku": "CONSOLE", "qty": 50})))[0] == 201


async def test_an_unreadable_sync_database_never_fails_a_write_and_the_caps_last_read_apply(start_agent, tmp_path):
    agent = await start_agent()
    await store_snapshot(agent, 1, cap_item("CONSOLE", 1, time.time() - 3600))
    assert (await agent.post(command("c1", {"type": "sold", "sku": "CONSOLE", "qty": 1})))[0] == 201
    # sync.db is overwritten in place with garbage (a broken disk): nothing reads as a database.
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / f"events.sync.db{suffix}"
        if path.exists():
            with open(path, "r+b") as fh:
                fh.write(b"\xa5" * max(path.stat().st_size, 65536))
    status, body = await agent.post(command("c2", {"type": "sold", "sku": "CONSOLE", "qty": 1}))
    assert status == 409 and body["error"]["code"] == "sales_cap_reached", body   # the cap last read holds
    assert agent.ctx.log._caps_for.failures >= 1   # it was the fallback that answered, not the file
    # A SKU whose cap was never read is uncapped, and writes go on.
    assert (await agent.post(command("c3", {"type": "sold", "sku": "OTHER", "qty": 3})))[0] == 201
    assert (await agent.post(command("c4", {"type": "received", "sku": "CONSOLE", "qty": 3})))[0] == 201
