"""The store's two processes, for real: `edge-agent run` supervises `edge-agent sync`.

Each test starts mosquitto, `edge-hub run` and the agent as real processes and kills
them with real signals. After every scenario `assert_healed` checks: the hub holds
1..last_seq once each, equal to the agent's export; the hub's ack == the cursor ==
last_seq; no conflicts; `edge-agent verify` passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.support.agentproc import agent_command
from tests.sync.agents import Poster, assert_healed, grows, post_events, sync_agent, sync_status
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

CYCLES = 20
pytestmark = pytest.mark.slow

FAST = {"restart_min_s": 0.05, "restart_max_s": 0.2, "heartbeat_s": 0.2}


def sync_child(agent) -> int:
    """The pid of the agent's sync child, once it has recorded itself alive in sync.db."""
    def found():
        children = agent.children()
        pid = sync_status(agent)["sync_pid"]
        return pid if pid in children else None
    return wait_until(found, 20, "the agent's sync child")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:   # a zombie has exited too
            return fh.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sync_process_sigkilled_mid_drain(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, **FAST) as agent:
        for cycle in range(CYCLES):
            pid = sync_child(agent)
            post_events(agent, 600)
            acked = sync_status(agent)["acked_seq"]
            wait_until(lambda: sync_status(agent)["acked_seq"] > acked, 20, "the drain to be under way")
            os.kill(pid, signal.SIGKILL)
            # Writes go on while sync is down; the agent replaces its child.
            post_events(agent, 50)
            wait_until(lambda: sync_status(agent)["sync_restarts"] == cycle + 1, 20, "a restart")
        post_events(agent, 50)
        assert_healed(agent, hub)
        assert agent.request("GET", "/v1/sync")[1]["sync_restarts"] == CYCLES


def test_agent_sigkilled_mid_burst(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, **FAST) as agent:
        for _ in range(CYCLES):
            child = sync_child(agent)
            with Poster(agent):
                grows(agent, sync_status(agent)["last_seq"] + 300)
                agent.kill()
            # The sync child dies with its agent: nothing of the old service is left.
            wait_until(lambda: gone(child), 10, f"the sync child {child} to die with its agent")
            agent.start()
        post_events(agent, 50)
        assert_healed(agent, hub)


def test_sync_alone_before_the_agent_then_an_agent_that_never_starts_sync(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub:
        agent = sync_agent(tmp_path, broker, **FAST)
        agent.run_args = ["--no-sync"]
        agent._write_config()
        out = open(tmp_path / "sync.out", "ab")
        sync = subprocess.Popen([*agent_command(), "sync", "--config", str(agent.config_path)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: "waiting for the log" in (tmp_path / "sync.out").read_text(), 20,
                       "sync to wait for the log")
            with agent:
                assert agent.children() == []           # --no-sync: the agent starts no child
                post_events(agent, 300)
                assert_healed(agent, hub)
                sync.send_signal(signal.SIGTERM)
                assert sync.wait(15) == 0
                post_events(agent, 40)                  # sync stopped: the store goes on alone
                status = sync_status(agent)
                assert status["backlog"] == 40 and status["acked_seq"] == status["last_seq"] - 40
                assert agent.children() == []
        finally:
            if sync.poll() is None:
                sync.kill()
            out.close()


def test_a_frozen_sync_is_restarted_and_the_kiosk_keeps_answering(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, \
            sync_agent(tmp_path, broker, stall_after_s=1.5, **FAST) as agent:
        post_events(agent, 100)
        assert_healed(agent, hub, verify=False)
        pid = sync_child(agent)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            while time.monotonic() - started < 1.0:     # kiosk reads while sync is frozen
                t0 = time.perf_counter()
                status, _ = agent.request("GET", "/v1/availability/SKU-1")
                assert status == 200 and time.perf_counter() - t0 < 0.5
            wait_until(lambda: sync_status(agent)["sync_stalls"] == 1, 20, "the stall to be noticed")
            wait_until(lambda: gone(pid), 10, "the frozen sync to be killed")
        finally:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        assert sync_child(agent) != pid
        post_events(agent, 100)
        assert_healed(agent, hub)


def retained_status(broker) -> dict:
    """The store's retained status message, as a new subscriber receives it."""
    import asyncio
    import json

    from sync import protocol
    from tests.sync.helpers import PREFIX, STORE, eventually, mqtt_client

    async def read() -> dict:
        seen: list[dict] = []

        async def keep(message) -> None:
            seen.append(json.loads(message.payload))

        client = mqtt_client(broker, "test-status-reader")
        client.subscribe(protocol.status_topic(PREFIX, STORE), keep)
        await client.start()
        try:
            await eventually(lambda: seen, 10, "the retained status")
        finally:
            await client.stop()
        return seen[-1]

    return asyncio.run(read())


def test_clean_stop_stops_the_child_and_publishes_offline(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker, **FAST) as agent:
        post_events(agent, 20)
        assert_healed(agent, hub, verify=False)
        pid = sync_child(agent)
        assert retained_status(broker)["state"] == "online"
        assert agent.terminate() == 0
        assert gone(pid)
        assert "edge-agent sync stopped (status 0)" in agent.output()
        assert retained_status(broker)["state"] == "offline"
