"""Every row and status code of the contract's HTTP table, through a real server."""

from __future__ import annotations

import json
import logging

import pytest

from common.errors import StorageError, StorageFull

from .conftest import STORE


def receive(sku: str = "A1", qty: int = 5, **extra) -> dict:
    return {"type": "received", "sku": sku, "qty": qty, **extra}


def cmd(command_id: str, *events: dict) -> dict:
    return {"command_id": command_id, "events": list(events)}


def assert_error(answer: dict, code: str, field: str | None = None) -> None:
    assert set(answer) == {"error"}, answer
    err = answer["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    if field is None:
        assert "field" not in err, err
    else:
        assert err["field"] == field, err


# ------------------------------------------------------------------ health


async def test_healthz_answers_ok(agent):
    assert await agent.get("/healthz") == (200, {"status": "ok"})


async def test_readyz_is_200_when_ready_and_503_when_not(agent):
    status, body = await agent.get("/readyz")
    assert status == 200 and body["status"] == "ready"
    agent.ctx.ready = False
    status, body = await agent.get("/readyz")
    assert status == 503 and body["status"] == "not_ready"


# ------------------------------------------------------------- POST events


async def test_new_command_is_201_with_its_seqs(agent):
    status, body = await agent.post(cmd("c1", receive(), receive("B2", 3)))
    assert status == 201
    assert body == {"command_id": "c1", "first_seq": 1, "last_seq": 2, "duplicate": False}
    assert agent.last_seq == 2


async def test_same_command_same_body_is_200_duplicate_and_appends_nothing(agent):
    first = await agent.post(cmd("c1", receive()))
    again = await agent.post(cmd("c1", receive()))
    assert first == (201, {"command_id": "c1", "first_seq": 1, "last_seq": 1, "duplicate": False})
    assert again == (200, {"command_id": "c1", "first_seq": 1, "last_seq": 1, "duplicate": True})
    assert agent.last_seq == 1


async def test_same_command_other_body_is_409_and_appends_nothing(agent):
    await agent.post(cmd("c1", receive(qty=5)))
    status, body = await agent.post(cmd("c1", receive(qty=6)))
    assert status == 409
    assert_error(body, "command_conflict", "command_id")
    assert agent.last_seq == 1


@pytest.mark.parametrize("qty", ["5", 5.0, True, 0, 1_000_001, None])
async def test_qty_that_is_not_an_integer_in_range_is_422_naming_it(agent, qty):
    status, body = await agent.post(cmd("c1", receive(), receive(qty=qty)))
    assert status == 422
    assert_error(body, "invalid", "events[1].qty")
    assert agent.last_seq == 0


@pytest.mark.parametrize("event, field", [
    ({"type": "received", "qty": 1}, "events[0].sku"),
    ({"type": "teleported", "sku": "A1", "qty": 1}, "events[0].type"),
    ({"sku": "A1", "qty": 1}, "events[0].type"),
    (receive(colour="red"), "events[0].colour"),
    (receive(sku="bad sku"), "events[0].sku"),
    (receive(sku="A1\n"), "events[0].sku"),
    (receive(location="attic"), "events[0].location"),
    (receive(occurred_at="yesterday"), "events[0].occurred_at"),
    ({"type": "moved", "sku": "A1", "qty": 1, "from": "floor", "to": "floor"}, "events[0].to"),
    ({"type": "adjusted", "sku": "A1", "location": "floor", "delta": 0, "reason": "found"}, "events[0].delta"),
    ({"type": "adjusted", "sku": "A1", "location": "floor", "delta": 1, "reason": "magic"}, "events[0].reason"),
])
async def test_invalid_event_field_is_422_naming_the_field(agent, event, field):
    status, body = await agent.post(cmd("c1", event))
    assert status == 422
    assert_error(body, "invalid", field)
    assert agent.last_seq == 0


@pytest.mark.parametrize("body, field", [
    ({"events": [receive()]}, "command_id"),
    ({"command_id": "", "events": [receive()]}, "command_id"),
    ({"command_id": "x" * 129, "events": [receive()]}, "command_id"),
    ({"command_id": "c1", "events": []}, "events"),
    ({"command_id": "c1", "events": [receive()] * 1001}, "events"),
    ({"command_id": "c1", "events": [receive()], "extra": 1}, "extra"),
    ([receive()], None),
])
async def test_invalid_command_is_422_naming_the_field(agent, body, field):
    status, answer = await agent.post(body)
    assert status == 422
    assert_error(answer, "invalid", field)
    assert agent.last_seq == 0


async def test_thousand_events_is_the_most_one_command_takes(agent):
    status, body = await agent.post(cmd("c1", *[receive(f"S{i}") for i in range(1000)]))
    assert status == 201 and (body["first_seq"], body["last_seq"]) == (1, 1000)


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"command_id": "c1", "events": [}'])
async def test_body_that_is_not_json_is_400(agent, raw):
    status, body = await agent.post(None, raw=raw)
    assert status == 400
    assert_error(body, "invalid_json")
    assert agent.last_seq == 0


async def test_body_over_one_mib_is_413(agent):
    pad = "x" * (1024 * 1024)
    status, body = await agent.post(cmd("c1", receive(ref=pad)))
    assert status == 413
    assert_error(body, "body_too_large")
    assert agent.last_seq == 0


async def test_chunked_body_over_one_mib_is_413(agent):
    async def chunks():
        yield b'{"command_id": "c1", "events": [{"type": "received", "sku": "A1", "qty": 1, "ref": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}]}'

    async with agent.http.post("/v1/events", data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert_error(await resp.json(), "body_too_large")
    assert agent.last_seq == 0


async def test_refused_reservation_is_409_insufficient_stock_and_all_or_none(agent):
    await agent.post(cmd("c1", receive(qty=2)))
    batch = cmd("c2", receive(qty=1), {"type": "reserved", "sku": "A1", "qty": 10, "reservation_id": "r1"})
    status, body = await agent.post(batch)
    assert status == 409
    assert_error(body, "insufficient_stock", "events[1].qty")
    assert agent.last_seq == 1
    assert (await agent.get("/v1/stock/A1"))[1]["backroom"] == 2


@pytest.mark.parametrize("intent, code", [
    ({"type": "reservation_released", "reservation_id": "nope"}, "unknown_reservation"),
    ({"type": "reservation_fulfilled", "reservation_id": "nope"}, "unknown_reservation"),
])
async def test_unknown_reservation_is_409(agent, intent, code):
    status, body = await agent.post(cmd("c1", intent))
    assert status == 409
    assert_error(body, code, "events[0].reservation_id")


async def test_reservation_lifecycle_through_the_api(agent):
    await agent.post(cmd("c1", receive(qty=5, location="floor")))
    assert (await agent.post(cmd("c2", {"type": "reserved", "sku": "A1", "qty": 2, "reservation_id": "r1"})))[0] == 201
    status, body = await agent.post(cmd("c3", {"type": "reserved", "sku": "A1", "qty": 1, "reservation_id": "r1"}))
    assert status == 409 and body["error"]["code"] == "reservation_exists"
    assert (await agent.post(cmd("c4", {"type": "reservation_fulfilled", "reservation_id": "r1"})))[0] == 201
    status, body = await agent.post(cmd("c5", {"type": "reservation_released", "reservation_id": "r1"}))
    assert status == 409 and body["error"]["code"] == "reservation_closed"
    assert (await agent.get("/v1/stock/A1"))[1] == {
        "sku": "A1", "floor": 3, "backroom": 0, "reserved": 0, "available": 3, "last_seq": 3}


async def test_storage_full_is_507_and_storage_error_503(agent, monkeypatch):
    async def full(command):
        raise StorageFull("storage: append: the disk is full")

    async def broken(command):
        raise StorageError("storage: append: disk I/O error")

    monkeypatch.setattr(agent.ctx.log, "append", full)
    status, body = await agent.post(cmd("c1", receive()))
    assert status == 507 and body["error"]["code"] == "storage_full"
    monkeypatch.setattr(agent.ctx.log, "append", broken)
    status, body = await agent.post(cmd("c1", receive()))
    assert status == 503 and body["error"]["code"] == "storage_unavailable"


# ------------------------------------------------------------------- auth


async def test_write_without_token_is_401(secured):
    status, body = await secured.post(cmd("c1", receive()))
    assert status == 401
    assert_error(body, "unauthorized")
    assert secured.last_seq == 0


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer s3cret-token-but-longer", "Bearer S3CRET-TOKEN"])
async def test_write_with_wrong_token_is_403(secured, header):
    async with secured.http.post("/v1/events", json=cmd("c1", receive()), headers={"Authorization": header}) as r:
        assert r.status == 403
        assert_error(await r.json(), "forbidden")
    assert secured.last_seq == 0


@pytest.mark.parametrize("header", ["Basic czNjcmV0", "s3cret-token", "Bearer "])
async def test_write_with_malformed_authorization_is_401(secured, header):
    async with secured.http.post("/v1/events", json=cmd("c1", receive()), headers={"Authorization": header}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert secured.last_seq == 0


async def test_write_with_the_token_is_accepted_and_reads_need_none(secured):
    assert (await secured.post(cmd("c1", receive()), token="s3cret-token"))[0] == 201
    assert (await secured.get("/v1/stock/A1"))[0] == 200
    assert (await secured.get("/v1/events"))[0] == 200


# ------------------------------------------------------------------ stock


async def test_stock_of_a_sku(agent):
    await agent.post(cmd("c1", receive(qty=7), {"type": "moved", "sku": "A1", "qty": 3, "from": "backroom", "to": "floor"},
                         {"type": "sold", "sku": "A1", "qty": 1}))
    assert await agent.get("/v1/stock/A1") == (200, {
        "sku": "A1", "floor": 2, "backroom": 4, "reserved": 0, "available": 6, "last_seq": 3})


async def test_stock_of_a_sku_never_seen_is_404(agent):
    await agent.post(cmd("c1", receive("A1")))
    status, body = await agent.get("/v1/stock/B2")
    assert status == 404
    assert_error(body, "unknown_sku", "sku")


async def test_stock_as_of_seq_travels_in_time(agent):
    for i, qty in enumerate((5, 3, 2)):
        await agent.post(cmd(f"c{i}", receive(qty=qty)))
    await agent.post(cmd("s", {"type": "sold", "sku": "A1", "qty": 4, "location": "backroom"}))
    expected = {1: 5, 2: 8, 3: 10, 4: 6}
    for seq, backroom in expected.items():
        status, body = await agent.get(f"/v1/stock/A1?as_of_seq={seq}")
        assert status == 200
        assert (body["backroom"], body["last_seq"]) == (backroom, seq)
    status, body = await agent.get("/v1/stock/A1?as_of_seq=0")
    assert status == 404 and body["error"]["code"] == "unknown_sku"


@pytest.mark.parametrize("query", ["-1", "abc", "1.5", "", "99", "1" * 40])
async def test_bad_as_of_seq_is_400_naming_it(agent, query):
    await agent.post(cmd("c1", receive()))
    status, body = await agent.get(f"/v1/stock/A1?as_of_seq={query}")
    assert status == 400
    assert_error(body, "invalid", "as_of_seq")


@pytest.mark.parametrize("path", ["/v1/stock/bad%20sku", "/v1/availability/bad%20sku", "/v1/stock/" + "A" * 65])
async def test_sku_outside_the_pattern_is_400_naming_it(agent, path):
    status, body = await agent.get(path)
    assert status == 400
    assert_error(body, "invalid", "sku")


# ----------------------------------------------------------- availability


async def test_availability_answers_here_from_the_projection(agent):
    await agent.post(cmd("c1", receive(qty=4), {"type": "reserved", "sku": "A1", "qty": 1, "reservation_id": "r"}))
    assert await agent.get("/v1/availability/A1") == (200, {
        "sku": "A1", "here": {"floor": 0, "backroom": 4, "reserved": 1, "available": 3},
        "nearby": [], "online": None, "snapshot": None, "sources": [], "cap": None})


async def test_availability_of_a_sku_not_stocked_here_is_zero_here(agent):
    status, body = await agent.get("/v1/availability/NEW-1")
    assert status == 200
    assert body["here"] == {"floor": 0, "backroom": 0, "reserved": 0, "available": 0}


async def test_availability_merges_the_snapshot_the_sync_process_stored(agent):
    import msgspec

    from agent.settings import sync_db_path
    from sync.state import SqliteSyncState

    state = await SqliteSyncState.open(sync_db_path(agent.ctx.config), STORE)
    try:
        item = msgspec.json.encode({"sku": "A1", "nearby": [{"store_id": "store-0043", "available": 9}], "online": 120})
        await state.apply_snapshot(7, "2026-11-27T13:00:00.000Z", [("A1", item, 120)], b"d")
    finally:
        await state.close()
    status, body = await agent.get("/v1/availability/A1")
    assert status == 200
    assert body["nearby"] == [{"store_id": "store-0043", "available": 9}] and body["online"] == 120
    assert body["snapshot"]["version"] == 7 and body["snapshot"]["generated_at"] == "2026-11-27T13:00:00.000Z"
    assert (await agent.get("/v1/sync"))[1]["snapshot_version"] == 7
    assert (await agent.get("/v1/availability/B2"))[1]["nearby"] == []


# ------------------------------------------------------------ events, sync


async def test_events_are_paged_in_seq_order(agent):
    await agent.post(cmd("c1", *[receive(f"S{i}") for i in range(5)]))
    status, page = await agent.get("/v1/events?after_seq=1&limit=3")
    assert status == 200
    assert [e["seq"] for e in page["events"]] == [2, 3, 4]
    assert page["next_after_seq"] == 4 and page["last_seq"] == 5
    assert all(e["store_id"] == STORE and e["command_id"] == "c1" and e["schema"] == 1 for e in page["events"])
    _, rest = await agent.get("/v1/events?after_seq=4")
    assert [e["seq"] for e in rest["events"]] == [5]
    _, empty = await agent.get("/v1/events?after_seq=5")
    assert empty == {"events": [], "next_after_seq": 5, "last_seq": 5}


@pytest.mark.parametrize("query, field", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
                                          ("after_seq=-3", "after_seq")])
async def test_bad_events_query_is_400_naming_it(agent, query, field):
    status, body = await agent.get(f"/v1/events?{query}")
    assert status == 400
    assert_error(body, "invalid", field)


async def test_sync_reports_what_the_sync_process_recorded(agent):
    from agent.settings import sync_db_path
    from sync.ports import UplinkStatus
    from sync.state import SqliteSyncState

    await agent.post(cmd("c1", receive(), receive("B")))
    _, before = await agent.get("/v1/sync")
    contract = ("last_seq", "acked_seq", "backlog", "connected", "last_ack_at", "snapshot_version")
    assert {k: before[k] for k in contract} == {
        "last_seq": 2, "acked_seq": 0, "backlog": 2, "connected": False, "last_ack_at": None,
        "snapshot_version": None}
    assert before["heartbeat_age_s"] is None   # sync never ran
    state = await SqliteSyncState.open(sync_db_path(agent.ctx.config), STORE)
    try:
        await state.store_cursor(1, "2026-11-27T13:00:00.000Z", UplinkStatus(connected=True, sent_seq=2))
    finally:
        await state.close()
    _, after = await agent.get("/v1/sync")
    assert {k: after[k] for k in contract} == {
        "last_seq": 2, "acked_seq": 1, "backlog": 1, "connected": True,
        "last_ack_at": "2026-11-27T13:00:00.000Z", "snapshot_version": None}
    assert after["sent_seq"] == 2 and 0 <= after["heartbeat_age_s"] < 5


# ------------------------------------------------------- metrics, routing


async def test_metrics_count_events_latency_last_seq_and_refusals(agent):
    await agent.post(cmd("c1", receive(), receive("B"), {"type": "sold", "sku": "A1", "qty": 1}))
    await agent.post(cmd("c2", receive(qty="5")))
    await agent.get("/v1/stock/A1")
    async with agent.http.get("/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    lines = set(text.splitlines())
    assert 'edge_agent_events_appended_total{type="received"} 2.0' in lines
    assert 'edge_agent_events_appended_total{type="sold"} 1.0' in lines
    assert "edge_agent_last_seq 3.0" in lines
    assert 'edge_agent_http_refused_total{code="invalid"} 1.0' in lines
    assert 'edge_agent_http_request_duration_seconds_count{method="GET",route="/v1/stock/{sku}"} 1.0' in lines
    assert 'edge_agent_http_request_duration_seconds_count{method="POST",route="/v1/events"} 2.0' in lines


async def test_unknown_path_is_404_and_wrong_method_405_in_the_error_shape(agent):
    status, body = await agent.get("/v2/nothing")
    assert status == 404
    assert_error(body, "not_found")
    async with agent.http.delete("/v1/events") as resp:
        assert resp.status == 405
        assert_error(await resp.json(), "method_not_allowed")
        assert "POST" in resp.headers["Allow"]


async def test_process_keeps_serving_after_every_refusal(agent):
    for raw in (b"{", b"[]", json.dumps(cmd("c", receive(qty=-1))).encode()):
        await agent.post(None, raw=raw)
    assert (await agent.post(cmd("ok", receive())))[0] == 201
    assert await agent.get("/healthz") == (200, {"status": "ok"})


async def test_every_refused_write_is_logged_once_with_its_reason(agent, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.api")
    status, _ = await agent.post(cmd("bad-qty", receive(qty="5")))
    assert status == 422
    status, _ = await agent.post(cmd("r1", {"type": "reserved", "sku": "NOPE", "qty": 1, "reservation_id": "x"}))
    assert status == 409
    refusals = [r.getMessage() for r in caplog.records if r.name == "edge_agent.api" and "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert "422 invalid (events[0].qty)" in refusals[0] and "Expected `int`, got `str`" in refusals[0]
    assert "409 insufficient_stock (events[0].qty)" in refusals[1]
