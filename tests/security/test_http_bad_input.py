"""The agent's HTTP API answers bad input with a 4xx naming what is wrong, and appends nothing."""

import pytest

from tests.api.test_contract import assert_error

RECEIVE = '{"type": "received", "sku": "A1", "qty": 2'


async def post_raw(agent, raw: bytes):
    status, body = await agent.post(None, raw=raw)
    return status, body


async def test_body_nested_too_deep_before_type_is_422_naming_the_field(agent):
    deep = b"[" * 5000 + b"]" * 5000
    raw = b'{"command_id": "c1", "events": [{"type": "received", "sku": "A1", "qty": 1}, {"x": ' + deep + \
          b', "type": "received", "sku": "A1", "qty": 1}]}'
    status, body = await post_raw(agent, raw)
    assert status == 422, body
    assert_error(body, "invalid", "events[1].x")
    assert "nested too deep" in body["error"]["message"]
    assert agent.last_seq == 0


async def test_unclosed_deep_nesting_is_refused_not_500(agent):
    status, body = await post_raw(agent, b'{"command_id": "c1", "events": [{"x": ' + b"{\"a\":" * 3000)
    assert status in (400, 422), body
    assert agent.last_seq == 0


@pytest.mark.parametrize("when", [
    "2026-13-45T99:99:99Z",      # the regex alone let this through
    "2026-02-29T10:00:00Z",      # not a leap year
    "2026-04-31T10:00:00.000Z",
    "2026-11-27T24:00:00Z",
    "2026-11-27T23:59:60Z",      # a leap second: Unix time (and the agent's clock) has none
    "0000-01-01T00:00:00Z",
])
async def test_occurred_at_that_is_no_real_date_time_is_422_naming_it(agent, when):
    raw = ('{"command_id": "c1", "events": [' + RECEIVE + '}, ' + RECEIVE +
           f', "occurred_at": "{when}"' + '}]}').encode()
    status, body = await post_raw(agent, raw)
    assert status == 422, body
    assert_error(body, "invalid", "events[1].occurred_at")
    assert agent.last_seq == 0


@pytest.mark.parametrize("when", ["2024-02-29T23:59:59Z", "2026-11-27T13:05:00.123Z",
                                  "2026-11-27T13:05:00.123456789Z", "2026-11-27T13:05:00.1Z"])
async def test_real_occurred_at_is_stored_as_sent(agent, when):
    status, body = await agent.post({"command_id": "c1", "events": [
        {"type": "received", "sku": "A1", "qty": 2, "occurred_at": when}]})
    assert status == 201, body
    status, page = await agent.get("/v1/events")
    assert page["events"][0]["occurred_at"] == when


@pytest.mark.parametrize("raw, field", [
    (b'{"command_id": "c1", "events": [' + RECEIVE.encode() + b', "qty": 3}]}', "events[0].qty"),
    (b'{"command_id":"c1","events":[{"type":"received","sku":"A1","qty":2,"qty":3}]}', "events[0].qty"),
    # escapes take the exact check's path; the key is still the same key
    (b'{"command_id": "c1", "events": [{"type": "received", "sku": "A\\u0031", "q\\u0074y": 2, "qty": 3}]}',
     "events[0].qty"),
    (b'{"command_id": "c1", "command_id": "c2", "events": [' + RECEIVE.encode() + b'}]}', "command_id"),
    (b'{"command_id": "c1", "events": [' + RECEIVE.encode() + b'}, {"type": "sold", "type": "sold", "sku": "A1",'
     b' "qty": 1}]}', "events[1].type"),
])
async def test_duplicate_key_in_the_body_is_422_naming_it(agent, raw, field):
    status, body = await post_raw(agent, raw)
    assert status == 422, body
    assert_error(body, "invalid", field)
    assert "duplicate" in body["error"]["message"]
    assert agent.last_seq == 0


async def test_same_keys_in_different_objects_are_not_duplicates(agent):
    raw = ('{"command_id": "c1", "events": [' + RECEIVE + ', "ref": "x:y\\"z"}, ' + RECEIVE + '}]}').encode()
    status, body = await post_raw(agent, raw)
    assert status == 201, body
    assert agent.last_seq == 2


@pytest.mark.parametrize("path, field", [
    ("/v1/stock/A1?as_of=3", "as_of"),
    ("/v1/stock/A1?as_of_seq=1&as_of_seq=2", "as_of_seq"),
    ("/v1/availability/A1?store=x", "store"),
    ("/v1/events?after=1", "after"),
    ("/v1/sync?verbose=1", "verbose"),
    ("/healthz?x=1", "x"),
    ("/readyz?x=1", "x"),
    ("/metrics?x=1", "x"),
    ("/openapi.json?x=1", "x"),
    ("/v1/search?q=A1&lmit=5", "lmit"),
    ("/v1/stream?x=1", "x"),
    ("/?x=1", "x"),
    ("/kiosk/kiosk.js?v=2", "v"),
])
async def test_unknown_or_repeated_query_parameter_is_400_naming_it(agent, path, field):
    await agent.post({"command_id": "c1", "events": [{"type": "received", "sku": "A1", "qty": 2}]})
    status, body = await agent.get(path)
    assert status == 400, body
    assert_error(body, "invalid", field)


async def test_as_of_is_not_taken_for_as_of_seq(agent):
    await agent.post({"command_id": "c1", "events": [{"type": "received", "sku": "A1", "qty": 2}]})
    await agent.post({"command_id": "c2", "events": [{"type": "received", "sku": "A1", "qty": 5}]})
    status, past = await agent.get("/v1/stock/A1?as_of_seq=1")
    assert (status, past["backroom"]) == (200, 2)
    status, body = await agent.get("/v1/stock/A1?as_of=1")
    assert status == 400 and body["error"]["field"] == "as_of", body


@pytest.mark.parametrize("limit", ["%C2%B2", "1" * 5000, "", "-1", "0", "51", "1.5", "%EF%BC%95"])
async def test_bad_search_limit_is_400_naming_it(agent, limit):
    status, body = await agent.get(f"/v1/search?q=A1&limit={limit}")
    assert status == 400, body
    assert_error(body, "invalid", "limit")


async def test_good_search_limit_still_answers(agent):
    await agent.post({"command_id": "c1", "events": [{"type": "received", "sku": "A1", "qty": 2}]})
    status, body = await agent.get("/v1/search?q=A1&limit=50")
    assert status == 200, body
    assert [item["sku"] for item in body["items"]] == ["A1"]
