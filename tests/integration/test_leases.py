"""Reservation leases in a real `edge-agent run`: expiry after SIGKILL and restart, across a
clock jump, and a till's `reservation_fulfilled` on an expired lease refused 409.

The agent's clock is moved with the test-only EDGE_AGENT_TEST_CLOCK_OFFSET_FILE (an offset
in seconds the running agent re-reads when the file changes). Each wait for "the job has
run" waits for a witness lease that is due to be released, never for a timer.
"""

from __future__ import annotations

import uuid

from agent.settings import TEST_CLOCK_ENV
from agent.verify import verify_log
from tests.support.agentproc import AgentProcess
from tests.sync.helpers import wait_until


def lease_agent(tmp_path, interval_s: float = 0.2) -> tuple[AgentProcess, object]:
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    agent = AgentProcess(tmp_path, env={TEST_CLOCK_ENV: str(offset)}, sections={
        "sync": {"enabled": False},
        "service": {"lease_expiry_interval_s": interval_s, "backup_interval_s": 0}})
    return agent, offset


def post(agent: AgentProcess, *events: dict, command_id: str | None = None) -> tuple[int, dict]:
    return agent.request("POST", "/v1/events", {"command_id": command_id or str(uuid.uuid4()),
                                                "events": list(events)})


def reserve(agent: AgentProcess, rid: str, ttl_s: int) -> None:
    status, body = post(agent, {"type": "reserved", "sku": "LAPTOP", "qty": 1, "reservation_id": rid,
                                "ttl_s": ttl_s})
    assert status == 201, body


def events(agent: AgentProcess) -> list[dict]:
    out, after = [], 0
    while True:
        page = agent.request("GET", f"/v1/events?after_seq={after}&limit=1000")[1]
        out.extend(page["events"])
        if not page["events"]:
            return out
        after = page["next_after_seq"]


def releases(agent: AgentProcess, rid: str) -> list[dict]:
    return [e for e in events(agent) if e["type"] == "reservation_released" and e["reservation_id"] == rid]


def test_an_expired_lease_is_released_once_after_sigkill_and_restart(tmp_path):
    agent, offset = lease_agent(tmp_path)
    with agent:
        assert post(agent, {"type": "received", "sku": "LAPTOP", "qty": 5, "location": "floor"})[0] == 201
        reserve(agent, "cart-1", ttl_s=3600)
        assert agent.request("GET", "/v1/stock/LAPTOP")[1]["reserved"] == 1
        agent.kill()
        offset.write_text("3601")   # the store was down past the lease's end
        agent.start()
        wait_until(lambda: releases(agent, "cart-1"), 20, "the expiry job to release cart-1")
        # SIGKILL again and restart: the job runs again (a witness lease due now is released)
        # and cart-1 is still released exactly once.
        reserve(agent, "witness-1", ttl_s=1)
        agent.kill()
        offset.write_text("3700")
        agent.start()
        wait_until(lambda: releases(agent, "witness-1"), 20, "the job to run after the second restart")
        [released] = releases(agent, "cart-1")
        assert released["reason"] == "expired" and released["command_id"] == "lease-expired:cart-1"
        assert agent.request("GET", "/v1/stock/LAPTOP")[1]["reserved"] == 0
        assert agent.terminate() == 0
    assert verify_log(agent.db_path).ok


def test_a_clock_jump_forward_expires_due_leases_only_and_a_jump_back_releases_nothing_twice(tmp_path):
    agent, offset = lease_agent(tmp_path)
    with agent:
        assert post(agent, {"type": "received", "sku": "LAPTOP", "qty": 5, "location": "floor"})[0] == 201
        reserve(agent, "short", ttl_s=1800)
        reserve(agent, "long", ttl_s=7200)
        offset.write_text("2000")   # the clock jumps forward 2000 s while the agent runs
        wait_until(lambda: releases(agent, "short"), 20, "the short lease to expire after the jump")
        assert releases(agent, "long") == []   # not yet due: not released early
        offset.write_text("-5000")  # the clock goes back: the long lease is further from its end
        reserve(agent, "witness-2", ttl_s=1)
        wait_until(lambda: releases(agent, "witness-2"), 20, "the job to run after the jump back")
        assert releases(agent, "long") == [] and len(releases(agent, "short")) == 1
        # The long lease can still be fulfilled by the till: it has not ended by the agent's clock.
        assert post(agent, {"type": "reservation_fulfilled", "reservation_id": "long"})[0] == 201
        offset.write_text("10000")
        reserve(agent, "witness-3", ttl_s=1)
        wait_until(lambda: releases(agent, "witness-3"), 20, "the job to run after the second jump")
        assert releases(agent, "long") == [], "a fulfilled reservation was released by expiry"
        assert len(releases(agent, "short")) == 1


def test_a_tills_fulfilled_on_an_expired_lease_is_refused_409_before_the_job_runs(tmp_path):
    agent, offset = lease_agent(tmp_path, interval_s=3600)   # the job does not run during this test
    with agent:
        assert post(agent, {"type": "received", "sku": "LAPTOP", "qty": 5, "location": "floor"})[0] == 201
        reserve(agent, "cart-9", ttl_s=600)
        offset.write_text("601")
        seq = agent.request("GET", "/v1/stock/LAPTOP")[1]["last_seq"]
        status, body = post(agent, {"type": "reservation_fulfilled", "reservation_id": "cart-9"})
        assert status == 409, body
        assert body["error"]["code"] == "lease_expired" and body["error"]["field"] == "events[0].reservation_id"
        assert "cart-9" in body["error"]["message"] and body["error"]["expires_at"]
        assert agent.request("GET", "/v1/stock/LAPTOP")[1] == {
            "sku": "LAPTOP", "floor": 5, "backroom": 0, "reserved": 1, "available": 4, "last_seq": seq}


def test_edge_agent_record_takes_a_lease(tmp_path):
    import json
    import subprocess
    import sys

    config = tmp_path / "agent.toml"
    config.write_text(f'[store]\nid = "store-0042"\n[storage]\npath = "{tmp_path / "events.db"}"\n')
    cli = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())", "--config", str(config)]

    def record(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, "record", *args], capture_output=True, text=True, timeout=60)

    assert record("received", "--sku", "LAPTOP", "--qty", "2").returncode == 0
    assert record("reserved", "--sku", "LAPTOP", "--qty", "1", "--reservation-id", "r1", "--ttl-s", "600").returncode == 0
    both = record("reserved", "--sku", "LAPTOP", "--qty", "1", "--reservation-id", "r2", "--ttl-s", "6",
                  "--expires-at", "2999-01-01T00:00:00Z")
    assert both.returncode == 1 and "expires_at" in both.stderr
    out = subprocess.run([*cli, "export"], capture_output=True, text=True, timeout=60)
    reserved = [json.loads(line) for line in out.stdout.splitlines() if '"reserved"' in line]
    assert len(reserved) == 1 and reserved[0]["expires_at"] > reserved[0]["recorded_at"]
