"""Crashes and outages with real processes and SIGKILL; after healing nothing is lost or doubled.

Invariants checked after every scenario (`assert_healed`): the hub holds 1..last_seq once
each, equal to the agent's export; the hub's ack == the agent's cursor == last_seq;
no conflicts; `edge-agent verify` passes.
"""

import shutil
import time

import pytest

from tests.sync.agents import Poster, assert_healed, grows, post_events, sync_agent, sync_status
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

CYCLES = 3
pytestmark = pytest.mark.slow


def test_agent_sigkilled_mid_burst(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for _ in range(CYCLES):
            with Poster(agent):
                grows(agent, sync_status(agent)["last_seq"] + 300)
                agent.kill()
            agent.start()
        post_events(agent, 50)
        assert_healed(agent, hub)


def test_hub_sigkilled_mid_batch(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for _ in range(CYCLES):
            with Poster(agent):
                wait_until(lambda: sync_status(agent)["acked_seq"] > 0 and sync_status(agent)["backlog"] > 0,
                           20, "the hub to be mid-drain")
                hub.kill()
                grows(agent, sync_status(agent)["last_seq"] + 200)
            hub.start()
        assert_healed(agent, hub)


def test_broker_sigkilled_and_restarted(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for _ in range(CYCLES):
            with Poster(agent):
                grows(agent, sync_status(agent)["last_seq"] + 300)
                broker.kill()
                time.sleep(0.2)  # an outage, not a poll: the agent keeps appending meanwhile
                broker.start()
            wait_until(lambda: sync_status(agent)["connected"], 20, "the agent to reconnect")
        assert_healed(agent, hub)
        assert sync_status(agent)["reconnects"] >= CYCLES


def test_hub_offline_for_a_while_then_back(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, ack_timeout_s=0.5) as agent:
        for _ in range(CYCLES):
            assert hub.terminate() == 0
            before = sync_status(agent)
            for _ in range(5):
                post_events(agent, 200)
            wait_until(lambda: sync_status(agent)["resends"] > before["resends"], 20,
                       "the agent to resend while the hub is away")
            assert sync_status(agent)["backlog"] >= 1000
            hub.start()
            assert_healed(agent, hub, verify=False)
        assert_healed(agent, hub)


def test_hub_database_replaced_by_older_copy_rewinds_the_agent(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        for cycle in range(CYCLES):
            post_events(agent, 300)
            old_ack = assert_healed(agent, hub, verify=False)
            assert hub.terminate() == 0
            shutil.copy(hub.db_path, tmp_path / "hub-old.db")
            hub.start()
            post_events(agent, 400)
            assert_healed(agent, hub, verify=False)
            assert hub.terminate() == 0
            for suffix in ("-wal", "-shm"):
                hub.db_path.with_name(hub.db_path.name + suffix).unlink(missing_ok=True)
            shutil.copy(tmp_path / "hub-old.db", hub.db_path)
            hub.start()
            wait_until(lambda: sync_status(agent)["rewinds"] == cycle + 1, 20, "the agent to rewind")
            assert hub.stats()["stores"]["store-0042"]["acked_seq"] >= old_ack
        assert_healed(agent, hub)
