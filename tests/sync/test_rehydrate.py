"""Restore from a backup and replacement boxes never split a store's history.

Real mosquitto, real `edge-hub run`, real `edge-agent run` (with its sync child) and the
real CLI. The scenario of issue 17: sync to seq 8, stop, `edge-agent restore --from` a
backup at seq 5, run, post 4 events. Writes are refused (503) until the log holds the
hub's 6..8 again; then the 4 events get seqs 9..12, agent and hub exports are equal, the
hub has no conflict and a nearby store's kiosk shows this store's real stock.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
import uuid

from tests.support.agentproc import AgentProcess, free_port
from tests.sync.agents import agent_cli, agent_export, assert_healed, sync_agent, wait_synced
from tests.sync.helpers import STORE, wait_until
from tests.sync.hubproc import HubProcess

NEARBY = "store-0043"
HUB_EXTRA = "[availability]\npublish_interval_s = 0.2\n"


def post_one(agent: AgentProcess, event: dict) -> tuple[int, dict]:
    return agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": [event]})


def received(qty: int, sku: str = "SKU-1") -> dict:
    return {"type": "received", "sku": sku, "qty": qty, "location": "floor"}


def spawn(agent: AgentProcess) -> None:
    """Start `edge-agent run` without waiting for /readyz (a fenced agent is not ready)."""
    agent.port = free_port()
    agent._write_config()
    agent._spawn()

    def alive():
        try:
            with urllib.request.urlopen(agent.url + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            assert agent.running, agent.output()[-3000:]
            return False
    wait_until(alive, 20, "the agent's /healthz")


def readyz(agent: AgentProcess) -> tuple[int, dict]:
    return agent.request("GET", "/readyz")


def nearby_agent(tmp_path, broker) -> AgentProcess:
    (tmp_path / NEARBY).mkdir()
    return AgentProcess(tmp_path / NEARBY, NEARBY, sections={
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "service": {"backup_interval_s": 0}})


def test_restore_from_an_older_backup_rehydrates_before_it_writes(tmp_path, broker):
    hub = HubProcess(tmp_path / "hub", broker, stores=(STORE, NEARBY), extra=HUB_EXTRA)
    with hub, sync_agent(tmp_path, broker) as agent, nearby_agent(tmp_path, broker) as other:
        for qty in (10, 20, 30, 40, 50):
            assert post_one(agent, received(qty))[0] == 201
        # A backup on demand while the service holds the log.
        done = agent_cli(agent, "backup")
        assert done.returncode == 0, done.stderr.decode()
        backup = done.stdout.decode().split(":")[0]
        assert backup.endswith("-seq5.db"), done.stdout
        for qty in (1, 2, 3):
            assert post_one(agent, received(qty))[0] == 201
        wait_synced(agent)
        before = agent_export(agent)
        assert [e["seq"] for e in before] == list(range(1, 9))
        assert agent.terminate() == 0

        done = agent_cli(agent, "restore", "--from", backup)
        assert done.returncode == 0, done.stderr.decode()
        assert sqlite3.connect(agent.db_path).execute(
            "SELECT value FROM meta WHERE key = 'incarnation'").fetchone() == ("2",)

        # The hub is away: the restored box hears only the broker's retained ack (8).
        assert hub.terminate() == 0
        started = time.monotonic()
        spawn(agent)
        status, answer = post_one(agent, received(7))
        assert status == 503, answer
        assert answer["error"]["code"] in ("rehydrating", "awaiting_hub"), answer

        def fenced_for_the_hubs_8():
            status, answer = readyz(agent)
            return answer if status == 503 and answer.get("reason") == "rehydrating" else None
        why = wait_until(fenced_for_the_hubs_8, 20, "/readyz to say the agent is rehydrating")
        assert (why["last_seq"], why["hub_acked_seq"]) == (5, 8)
        sync = agent.request("GET", "/v1/sync")[1]
        assert sync["writes_fenced"]["code"] == "rehydrating" and sync["hub_acked_seq"] == 8
        assert "edge_agent_writes_fenced 1.0" in agent.request("GET", "/metrics")[1]
        status, answer = post_one(agent, received(7))
        assert status == 503 and answer["error"]["code"] == "rehydrating", answer
        assert "1..8" in answer["error"]["message"] and "1..5" in answer["error"]["message"]
        # Reads keep working, from the restored log.
        status, stock = agent.request("GET", "/v1/stock/SKU-1")
        assert status == 200 and stock["floor"] == 150 and stock["last_seq"] == 5

        hub.start()
        wait_until(lambda: readyz(agent)[0] == 200, 30, "the agent to be whole again")
        seqs = []
        for qty in (4, 5, 6, 7):
            status, answer = post_one(agent, received(qty))
            assert status == 201, answer
            seqs.append(answer["first_seq"])
        assert seqs == [9, 10, 11, 12]
        sync = agent.request("GET", "/v1/sync")[1]
        assert sync["writes_fenced"] is None and sync["rehydrated_events"] == 3
        healed_s = time.monotonic() - started

        assert assert_healed(agent, hub) == 12
        after = agent_export(agent)
        assert after[:8] == before, "seqs 1..8 are the hub's (and the first box's) events, byte for byte"
        stats = hub.stats()
        assert stats["stores"][STORE]["conflicts"] == 0
        assert "ALARM" not in hub.output()
        assert after[-1]["seq"] == 12
        stock = agent.request("GET", "/v1/stock/SKU-1")[1]
        assert stock["available"] == 150 + 6 + 22

        def nearby_sees():
            answer = other.request("GET", "/v1/availability/SKU-1")[1]
            return answer["nearby"] == [{"store_id": STORE, "available": stock["available"]}]
        wait_until(nearby_sees, 30, "the nearby store's snapshot to show this store's real stock")
        assert healed_s < 40


def test_a_new_box_rehydrates_and_the_old_box_is_refused(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub:
        with sync_agent(tmp_path, broker) as old:
            status, answer = old.request("POST", "/v1/events", {"command_id": "eight", "events": [
                received(i + 1, f"SKU-{i % 3}") for i in range(8)]})
            assert status == 201 and answer["last_seq"] == 8, answer
            wait_synced(old)
            assert old.terminate() == 0

        (tmp_path / "new").mkdir()
        new = AgentProcess(tmp_path / "new", STORE, sections=old.sections, wait_connected=True)
        new._write_config()
        done = agent_cli(new, "rehydrate", "--timeout", "30")
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        assert agent_export(new) == hub.export(STORE)
        done = agent_cli(new, "verify")
        assert done.returncode == 0, done.stdout.decode()

        with new:
            # A retry of a command known only from the hub's history is a duplicate, never appended again.
            status, answer = new.request("POST", "/v1/events", {"command_id": "eight", "events": [received(1)]})
            assert (status, answer["first_seq"], answer["last_seq"], answer["duplicate"]) == (200, 1, 8, True)
            status, answer = post_one(new, received(9))
            assert status == 201 and answer["first_seq"] == 9, answer
            assert_healed(new, hub)
            ninth = hub.export(STORE)[8]

            # The replaced box comes back (incarnation 1): its own new events are refused at the hub.
            with old:
                wait_until(lambda: old.request("GET", "/v1/sync")[1]["last_seq"] == 9, 20,
                           "the old box to take the hub's seq 9")
                status, answer = post_one(old, received(99))
                assert status == 201 and answer["first_seq"] == 10, answer
                wait_until(lambda: hub.stats()["rejected"].get("stale_incarnation", 0) >= 1, 20,
                           "the hub to refuse the old incarnation's batch")
        stats = hub.stats()["stores"][STORE]
        assert stats["acked_seq"] == 9 and stats["conflicts"] == 0
        assert hub.export(STORE)[8] == ninth and len(hub.export(STORE)) == 9


def test_a_history_that_does_not_chain_is_refused_and_writes_stay_fenced(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub:
        with sync_agent(tmp_path, broker) as first:
            for qty in range(1, 9):
                assert post_one(first, received(qty))[0] == 201
            wait_synced(first)
            assert first.terminate() == 0

        # Another log for the same store: three events of its own, then started against the hub.
        (tmp_path / "other").mkdir()
        other = AgentProcess(tmp_path / "other", STORE, sections=first.sections)
        other._write_config()
        for qty in (5, 6, 7):
            done = agent_cli(other, "record", "received", "--sku", "SKU-9", "--qty", str(qty))
            assert done.returncode == 0, done.stderr.decode()
        spawn(other)

        def refused():
            status, answer = readyz(other)
            return answer if status == 503 and answer.get("reason") == "history_refused" else None
        why = wait_until(refused, 30, "the agent to refuse the hub's history")
        assert "does not chain" in why["message"]
        status, answer = post_one(other, received(1))
        assert status == 503 and answer["error"]["code"] == "history_refused", answer
        assert other.request("GET", "/v1/sync")[1]["last_seq"] == 3
        assert "ALARM" in other.output()
        assert other.terminate() == 0
        assert [e["seq"] for e in agent_export(other)] == [1, 2, 3]
        assert json.loads(json.dumps(hub.stats()))["stores"][STORE]["acked_seq"] == 8
