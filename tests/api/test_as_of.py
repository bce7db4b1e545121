"""Time travel by time: GET /v1/stock/{sku}?as_of=TIME and `edge-agent stock SKU --as-of TIME`.

The log is written first with a fake clock (so recorded_at is exact, including a clock
that goes back), then served by a real agent over the same file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys

import pytest

from agent import events as ev
from agent.log import SqliteEventLog
from tests.api.conftest import STORE

# (recorded_at, intent): the clock goes back from 10:05 to 09:58 between the 2nd and 3rd event.
HISTORY = [
    ("2026-11-27T10:00:00.000Z", ev.Receive(sku="A1", qty=5, location="floor")),
    ("2026-11-27T10:05:00.000Z", ev.Sell(sku="A1", qty=1)),
    ("2026-11-27T09:58:00.000Z", ev.Sell(sku="A1", qty=1)),
    ("2026-11-27T10:01:00.000Z", ev.Receive(sku="A1", qty=10, location="floor")),
    ("2026-11-27T10:10:00.000Z", ev.Sell(sku="A1", qty=2)),
]


async def write_history(path) -> None:
    times = iter(t for t, _ in HISTORY)
    log = await SqliteEventLog.open(path, STORE, now=lambda: next(times))
    try:
        for n, (_, intent) in enumerate(HISTORY):
            await log.append(ev.AppendCommand(f"c{n}", [intent]))
    finally:
        await log.close()


@pytest.fixture
async def agent(start_agent, tmp_path):
    await write_history(tmp_path / "events.db")
    return await start_agent()


@pytest.mark.parametrize("at, seq, floor", [
    ("2026-11-27T10:00:00Z", 1, 5),
    ("2026-11-27T10:00:00.000999Z", 1, 5),      # cut to the millisecond, not rounded up
    ("2026-11-27T10:02:00Z", 1, 5),             # the first event after 10:02 is seq 2
    ("2026-11-27T10:05:00.000Z", 4, 13),        # seq 3 and 4 were recorded (clock back) before seq 5
    ("2026-11-27T10:09:59.999Z", 4, 13),
    ("2026-11-27T10:10:00Z", 5, 11),
    ("2026-11-28T00:00:00Z", 5, 11),
])
async def test_as_of_answers_the_log_as_it_stood_at_that_time(agent, at, seq, floor):
    status, body = await agent.get(f"/v1/stock/A1?as_of={at}")
    assert status == 200, body
    assert body["as_of_seq"] == seq and body["floor"] == floor and body["as_of"] == at
    # The same answer as_of_seq gives for that cut.
    _, by_seq = await agent.get(f"/v1/stock/A1?as_of_seq={seq}")
    assert {k: body[k] for k in by_seq} == by_seq


async def test_as_of_before_the_first_event_is_404(agent):
    status, body = await agent.get("/v1/stock/A1?as_of=2026-11-27T09:59:59Z")
    assert status == 404 and body["error"]["code"] == "unknown_sku"


@pytest.mark.parametrize("query", [
    "as_of=2026-11-27T10:00:00Z&as_of_seq=1",
    "as_of=yesterday",
    "as_of=2026-13-01T00:00:00Z",
    "as_of=2026-11-27T10:00:00%2B01:00",        # UTC only, as every time in the API
    "as_of=2999-01-01T00:00:00Z",               # after the agent's clock
])
async def test_a_bad_as_of_is_400_naming_it(agent, query):
    seq = agent.last_seq
    status, body = await agent.get(f"/v1/stock/A1?{query}")
    assert status == 400 and body["error"]["field"] == "as_of", body
    assert agent.last_seq == seq


async def test_a_log_from_before_time_marks_gets_them_at_open(tmp_path):
    path = tmp_path / "events.db"
    await write_history(path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM time_marks")   # as a log written by an agent without them
    conn.commit()
    conn.close()
    log = await SqliteEventLog.open(path, STORE)
    try:
        assert [log.reader.seq_at(t) for t in ("2026-11-27T10:02:00.000Z", "2026-11-27T10:05:00.000Z")] == [1, 4]
    finally:
        await log.close()


def test_cli_stock_as_of(tmp_path):
    asyncio.run(write_history(tmp_path / "events.db"))
    config = tmp_path / "agent.toml"
    config.write_text(f'[store]\nid = "{STORE}"\n[storage]\npath = "{tmp_path / "events.db"}"\n')
    cli = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())", "--config", str(config)]
    out = subprocess.run([*cli, "stock", "A1", "--as-of", "2026-11-27T10:05:00Z", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"floor":13' in out.stdout and '"last_seq":4' in out.stdout
    bad = subprocess.run([*cli, "stock", "A1", "--as-of", "noon"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--as-of" in bad.stderr
    both = subprocess.run([*cli, "stock", "A1", "--as-of", "2026-11-27T10:05:00Z", "--as-of-seq", "2"],
                          capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "not both" in both.stderr


def test_as_of_in_a_real_agent_whose_clock_goes_back(tmp_path):
    """`edge-agent run` with its clock moved back between two sales (the test-only offset file)."""
    import json
    import time
    import urllib.parse
    import uuid

    from agent.settings import TEST_CLOCK_ENV
    from common.clock import rfc3339
    from tests.support.agentproc import AgentProcess

    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    with AgentProcess(tmp_path, env={TEST_CLOCK_ENV: str(offset)}, sections={"sync": {"enabled": False}}) as agent:
        def post(intent: dict) -> dict:
            status, body = agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": [intent]})
            assert status == 201, body
            return agent.request("GET", f"/v1/events?after_seq={body['first_seq'] - 1}&limit=1")[1]["events"][0]

        def as_of(at: str) -> tuple[int, dict]:
            return agent.request("GET", "/v1/stock/A1?as_of=" + urllib.parse.quote(at))

        first = post({"type": "received", "sku": "A1", "qty": 5, "location": "floor"})
        offset.write_text("-600")   # the clock steps back ten minutes
        second = post({"type": "sold", "sku": "A1", "qty": 1})
        assert second["recorded_at"] < first["recorded_at"]
        # Between the two stamps: the log held only the first event (the second came after it).
        status, body = as_of(second["recorded_at"])
        assert status == 404, body   # nothing had been recorded by the second's (earlier) stamp
        # The first's stamp is now in the agent's future and no event is recorded after it yet:
        # the answer could still change, so it is refused.
        status, body = as_of(first["recorded_at"])
        assert status == 400 and body["error"]["field"] == "as_of", body
        third = post({"type": "sold", "sku": "A1", "qty": 2, "occurred_at": first["recorded_at"]})
        offset.write_text("60")   # forward again, past the first's stamp: a fourth event after it
        fourth = post({"type": "received", "sku": "A1", "qty": 10, "location": "floor"})
        assert third["recorded_at"] < first["recorded_at"] < fourth["recorded_at"]
        offset.write_text("-600")
        status, body = as_of(first["recorded_at"])   # after the clock again, but the cut is fixed
        assert status == 200 and body["as_of_seq"] == 3 and body["floor"] == 2, body
        offset.write_text("120")   # now past the fourth's stamp (+60 s): every event counts
        status, body = as_of(rfc3339(time.time() + 90))
        assert status == 200 and body["as_of_seq"] == 4 and body["floor"] == 12, json.dumps(body)
