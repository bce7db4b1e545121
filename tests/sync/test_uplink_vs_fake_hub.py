"""A test client plays the hub against a real `edge-agent run`: resend, rewind, alarm."""

import asyncio

import pytest

from tests.sync.agents import post_events, sync_agent, sync_status
from tests.sync.helpers import FakeHub, eventually


@pytest.fixture
async def fake_hub(broker):
    async with FakeHub(broker) as hub:
        yield hub


@pytest.fixture
def agent(tmp_path, broker, fake_hub):
    with sync_agent(tmp_path, broker, ack_timeout_s=1.0, batch_max_events=50) as running:
        yield running


async def status(agent) -> dict:
    return await asyncio.to_thread(sync_status, agent)


async def test_no_ack_means_resend_from_acked_seq_plus_one(agent, fake_hub):
    await asyncio.to_thread(post_events, agent, 120)
    await eventually(lambda: (1, 50) in fake_hub.batches, what="the first batch")
    await fake_hub.ack(50)
    await eventually(lambda: fake_hub.batches.count((51, 100)) >= 2, what="a resend of 51..100")
    s = await status(agent)
    assert s["acked_seq"] == 50 and s["resends"] >= 1 and s["backlog"] == 70
    await fake_hub.ack(120)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["backlog"] == 0, what="backlog 0")


async def test_lower_ack_rewinds_the_cursor_and_resends(agent, fake_hub):
    await asyncio.to_thread(post_events, agent, 100)
    await eventually(lambda: (51, 100) in fake_hub.batches, what="both batches")
    await fake_hub.ack(100)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["acked_seq"] == 100, what="acked 100")
    sent_before = len(fake_hub.batches)
    await fake_hub.ack(30)  # the hub restored an older database
    await eventually(lambda: (31, 80) in fake_hub.batches[sent_before:], what="a resend from 31")
    s = await status(agent)
    assert s["acked_seq"] == 30 and s["rewinds"] == 1 and s["backlog"] == 70
    await fake_hub.ack(100)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["backlog"] == 0, what="backlog 0")


async def test_ack_above_last_seq_is_an_alarm_and_never_trusted(agent, fake_hub):
    await asyncio.to_thread(post_events, agent, 40)
    await eventually(lambda: (1, 40) in fake_hub.batches, what="the batch")
    await fake_hub.ack(20)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["acked_seq"] == 20, what="acked 20")
    await fake_hub.ack(5000)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["ack_alarms"] == 1, what="the alarm")
    s = await status(agent)
    assert s["acked_seq"] == 20 and s["backlog"] == 20
    assert s["alarm"]["code"] == "ack_above_log" and "says 5000 but the log ends at 40" in s["alarm"]["message"]
    assert "edge_agent_sync_ack_alarms_total 1.0" in agent.request("GET", "/metrics")[1]
    # The cursor persisted is the trusted one: after a restart the agent still says 20.
    agent.kill()
    await fake_hub.ack(20)
    await asyncio.to_thread(agent.start)
    s = await status(agent)
    assert s["acked_seq"] == 20


async def test_read_ahead_batches_are_dropped_when_an_ack_rewinds(agent, fake_hub):
    # batch 50, window 4: while 1..200 wait for an ack, 201..400 are read ahead.
    await asyncio.to_thread(post_events, agent, 600)
    await eventually(lambda: (151, 200) in fake_hub.batches, what="a full window")
    await fake_hub.ack(200)
    await eventually(lambda: (351, 400) in fake_hub.batches, what="the next window, from the read-ahead")
    assert fake_hub.batches[:8] == [(s, s + 49) for s in range(1, 400, 50)]
    sent_before = len(fake_hub.batches)
    await fake_hub.ack(30)  # a rewind while 401..600 are read ahead
    await eventually(lambda: len(fake_hub.batches) >= sent_before + 4, what="a resent window")
    assert fake_hub.batches[sent_before:sent_before + 4] == [(31, 80), (81, 130), (131, 180), (181, 230)]
    await fake_hub.ack(600)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["backlog"] == 0, what="backlog 0")
