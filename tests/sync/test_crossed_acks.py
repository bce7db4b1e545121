"""Two test clients play two hub workers against a real `edge-agent run`: their acks cross.

A worker's ack carries the hub's epoch and the store's rev. An ack published before a
newer one but arriving after it (same epoch, lower rev) must not rewind the agent, not
even after a restart when it comes back as the retained ack; a lower ack of a new epoch
(the hub's record was restored) must.
"""

import asyncio

import pytest

from tests.sync.agents import post_events, sync_agent, sync_status
from tests.sync.helpers import FakeHub, eventually


@pytest.fixture
async def workers(broker):
    async with FakeHub(broker, client_id="fake-hub-0") as one, FakeHub(broker, client_id="fake-hub-1") as two:
        yield one, two


@pytest.fixture
def agent(tmp_path, broker, workers):
    with sync_agent(tmp_path, broker, ack_timeout_s=30.0, batch_max_events=50) as running:
        yield running


async def status(agent) -> dict:
    return await asyncio.to_thread(sync_status, agent)


async def test_a_crossed_older_ack_never_rewinds_the_agent(agent, workers):
    one, two = workers
    await asyncio.to_thread(post_events, agent, 100)
    await eventually(lambda: (51, 100) in one.batches, what="both batches")
    await one.ack(100, "epoch-a", 2)      # the newer commit's ack arrives first...
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["acked_seq"] == 100, what="acked 100")
    sent = len(one.batches)
    await two.ack(50, "epoch-a", 1)       # ...then the older one, from the other worker
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["counters"].get("stale_acks") == 1,
                     what="the stale ack counted")
    s = await status(agent)
    assert (s["acked_seq"], s["rewinds"], s["backlog"]) == (100, 0, 0)
    assert "edge_agent_sync_stale_acks_total 1.0" in agent.request("GET", "/metrics")[1]
    # The stale ack is now the retained one: after a restart the stored mark still wins.
    agent.kill()
    await asyncio.to_thread(agent.start)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["counters"].get("stale_acks") == 2,
                     what="the retained stale ack counted after the restart")
    s = await status(agent)
    assert (s["acked_seq"], s["rewinds"]) == (100, 0)
    assert len(one.batches) == sent       # nothing was resent


async def test_a_lower_ack_of_a_new_epoch_rewinds(agent, workers):
    one, two = workers
    await asyncio.to_thread(post_events, agent, 100)
    await eventually(lambda: (51, 100) in one.batches, what="both batches")
    await one.ack(100, "epoch-a", 2)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["acked_seq"] == 100, what="acked 100")
    sent = len(one.batches)
    await two.ack(30, "epoch-b", 1)       # the hub's record was restored: a new epoch
    await eventually(lambda: (31, 80) in one.batches[sent:], what="a resend from 31")
    s = await status(agent)
    assert s["rewinds"] == 1 and s["counters"].get("stale_acks", 0) == 0
    await two.ack(100, "epoch-b", 2)
    await eventually(lambda: agent.request("GET", "/v1/sync")[1]["backlog"] == 0, what="backlog 0")
