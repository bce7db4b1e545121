"""Agent, broker and hub as real processes: events reach the hub exactly once, gapless."""

from tests.sync.agents import assert_healed, post_events, sync_agent, sync_status
from tests.sync.helpers import AckWatcher, eventually
from tests.sync.hubproc import HubProcess


async def test_events_reach_the_hub_exactly_once_and_the_ack_reaches_last_seq(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for _ in range(3):
            post_events(agent, 700)
        last = assert_healed(agent, hub, verify=False)
        assert last == 2100
        async with AckWatcher(broker) as acks:
            await eventually(lambda: acks.last == 2100, what="the retained ack at last_seq")
        status = sync_status(agent)
        assert status["connected"] is True and status["backlog"] == 0
        assert status["last_ack_at"] is not None and status["ack_alarms"] == 0
        status_code, metrics = agent.request("GET", "/metrics")
        assert "edge_agent_sync_backlog 0.0" in metrics
        assert agent.terminate() == 0
        assert hub.terminate() == 0


def test_mqtt_311_end_to_end(tmp_path, broker):
    agent = sync_agent(tmp_path, broker)
    agent.sections["mqtt"]["protocol"] = 4
    with HubProcess(tmp_path / "hub", broker, protocol=4) as hub, agent:
        post_events(agent, 300)
        assert assert_healed(agent, hub, verify=False) == 300


def test_rate_cap_spreads_the_drain(tmp_path, broker):
    import time

    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, rate_limit_eps=500,
                                                                  ack_timeout_s=10) as agent:
        started = time.monotonic()
        post_events(agent, 1000)
        assert assert_healed(agent, hub, verify=False) == 1000
        assert time.monotonic() - started >= 1.5, "1000 events at 500/s take about 2 s"
