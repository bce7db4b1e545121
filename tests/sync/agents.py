"""Agent-side helpers for the sync tests: start an agent wired to a test broker, post, check."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import uuid

from tests.support.agentproc import AgentProcess, agent_command
from tests.sync.helpers import STORE, wait_until


def sync_agent(tmp_path, broker, launcher=(), **sync) -> AgentProcess:
    options = {"batch_max_events": 100, "ack_timeout_s": 2.0, "max_inflight": 4}
    options.update(sync)
    (tmp_path / "agent").mkdir(exist_ok=True)
    return AgentProcess(tmp_path / "agent", STORE, sections={
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "sync": options,
        "service": {"backup_interval_s": 0},
    }, launcher=launcher, wait_connected=True)


def post_events(agent: AgentProcess, n: int) -> tuple[int, int]:
    """Append `n` received events in one command; return (first_seq, last_seq)."""
    events = [{"type": "received", "sku": f"SKU-{i % 50}", "qty": 1 + i % 7} for i in range(n)]
    status, answer = agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": events})
    assert status == 201, answer
    return answer["first_seq"], answer["last_seq"]


def sync_status(agent: AgentProcess) -> dict:
    status, answer = agent.request("GET", "/v1/sync")
    assert status == 200, answer
    return answer


def agent_cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*agent_command(), "--config", str(agent.config_path), *args],
                          capture_output=True, timeout=120)


def agent_export(agent: AgentProcess) -> list[dict]:
    done = agent_cli(agent, "export")
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def wait_synced(agent: AgentProcess, timeout: float = 60.0) -> dict:
    """Wait until the agent's backlog is 0 (hub acked everything); return the sync status."""
    def done():
        s = sync_status(agent)
        return s if s["backlog"] == 0 and s["acked_seq"] == s["last_seq"] else None
    return wait_until(done, timeout, "the agent's backlog to reach 0")


def assert_healed(agent: AgentProcess, hub, *, verify: bool = True) -> int:
    """The invariants after healing: hub holds 1..last once each, equal to the agent's log."""
    status = wait_synced(agent)
    last = status["last_seq"]
    hub_events = hub.export(STORE)
    assert [e["seq"] for e in hub_events] == list(range(1, last + 1)), "hub must hold 1..last once each"
    assert hub_events == agent_export(agent), "hub's events must equal the agent's export"
    stats = hub.stats()["stores"][STORE]
    assert stats["acked_seq"] == last == status["acked_seq"]
    assert stats["conflicts"] == 0
    if verify:
        done = agent_cli(agent, "verify")
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return last


class Poster:
    """Posts bursts from a thread until stopped; tolerates a dead or restarting agent."""

    def __init__(self, agent, size: int = 200):
        self.agent, self.size, self.posted = agent, size, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                post_events(self.agent, self.size)
                self.posted += 1
            except (urllib.error.URLError, ConnectionError, OSError, AssertionError):
                time.sleep(0.05)

    def __enter__(self) -> "Poster":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def grows(agent, beyond: int) -> int:
    return wait_until(lambda: sync_status(agent)["last_seq"] > beyond and sync_status(agent)["last_seq"],
                      20, f"the log to grow past {beyond}")
