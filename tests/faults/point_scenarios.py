"""Issue 17 scenario 2 as runs with figures: crashes at the fault points of common/faults.py.

- `run_agent_point`: the agent SIGKILLs itself between the log's commit and the HTTP
  reply; the client saw no answer, retries with the same command_id after the restart and
  is answered 200 duplicate with the seqs the log holds (stored once, never twice).
- `run_sync_point(point)`: the sync process SIGKILLs itself after a batch reached the
  broker and before the hub's ack arrived (`sync.after_publish`), or after the ack arrived
  and before the cursor was saved (`sync.before_cursor_save`); the supervisor restarts it
  (the mark file keeps the restarted one from firing again), it resends from its durable
  cursor and the hub dedups.

Each cycle re-arms the point with a fresh mark file on a clean agent restart.
"""

from __future__ import annotations

import random
import time
import urllib.error
import uuid
from pathlib import Path

from tests.faults.invariants import AckSampler, check_invariants
from tests.faults.kill_scenarios import SYNC
from tests.faults.net_load import Figures, PacedWriter
from tests.support.broker import Broker
from tests.sync.agents import sync_agent, sync_status
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess


def _arm(agent, point: str, mark: Path) -> None:
    agent.env = {"EDGE_FAULT_POINT": point, "EDGE_FAULT_MARK": str(mark)}


def _command(n: int = 10) -> dict:
    return {"command_id": str(uuid.uuid4()),
            "events": [{"type": "received", "sku": f"SKU-{i % 50}", "qty": 1 + i % 7} for i in range(n)]}


def run_agent_point(tmp_path: Path, cycles: int = 3, seed: int = 6) -> Figures:
    figures, rng = Figures("crash between commit and HTTP reply"), random.Random(seed)
    with Broker(tmp_path / "broker") as broker, HubProcess(tmp_path / "hub", broker) as hub:
        agent = sync_agent(tmp_path, broker, **SYNC)
        writer = PacedWriter(agent)   # only its books: posts are made here, one by one
        _arm(agent, f"agent.after_commit:{rng.randint(1, 8)}", tmp_path / "mark-0")
        with agent:
            sampler = AckSampler(agent, hub).start()
            for cycle in range(cycles):
                while True:
                    command = _command()
                    try:
                        status, body = agent.request("POST", "/v1/events", command, timeout=5)
                    except (urllib.error.URLError, ConnectionError, OSError):
                        break                      # no answer: the agent died after the commit
                    assert status == 201, body
                    writer.acked[command["command_id"]] = (body["first_seq"], body["last_seq"])
                killed = time.monotonic()
                assert agent.proc.wait(10) == -9, "the agent killed itself at the point"
                last = cycle == cycles - 1
                _arm(agent, f"agent.after_commit:{rng.randint(1, 8)}",
                     tmp_path / f"mark-{0 if last else cycle + 1}")   # the last restart stays disarmed
                agent.start()
                status, body = agent.request("POST", "/v1/events", command)   # the client's retry
                figures.recovery_s.append(time.monotonic() - killed)
                assert status == 200 and body["duplicate"] is True, (status, body)
                writer.acked[command["command_id"]] = (body["first_seq"], body["last_seq"])
                figures.cycles += 1
            check_invariants(agent, hub, writer, figures, sampler=sampler)
    return figures


def run_sync_point(tmp_path: Path, point: str, cycles: int = 2, seed: int = 7) -> Figures:
    what = {"sync.after_publish": "crash between publish and the hub's ack",
            "sync.before_cursor_save": "crash between the hub's ack and the cursor save"}[point]
    figures, rng = Figures(what), random.Random(seed)
    with Broker(tmp_path / "broker") as broker, HubProcess(tmp_path / "hub", broker) as hub:
        agent = sync_agent(tmp_path, broker, **SYNC)
        try:
            _sync_point_cycles(agent, hub, point, cycles, rng, tmp_path, figures)
        finally:
            if agent.running:
                agent.kill()
    return figures


def _sync_point_cycles(agent, hub, point: str, cycles: int, rng: random.Random, tmp_path: Path,
                       figures: Figures) -> None:
    with PacedWriter(agent, 400, timeout=3.0) as writer:
        for cycle in range(cycles):
            mark = tmp_path / f"mark-{cycle}"
            _arm(agent, f"{point}:{rng.randint(1, 6)}", mark)
            deaths = agent.output().count("exited with signal SIGKILL")   # before the start: it may fire at once
            agent.start()
            sampler = AckSampler(agent, hub).start()
            wait_until(mark.exists, 30, f"the sync to pass {point}")
            fired = time.monotonic()
            wait_until(lambda: agent.output().count("exited with signal SIGKILL") > deaths, 10,
                       "the supervisor to see the sync killed")
            mark_seq = sync_status(agent)["last_seq"]
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark_seq, 30, "the restarted sync to catch up")
            figures.recovery_s.append(time.monotonic() - fired)
            figures.cycles += 1
            sampler.stop()
            if sampler.violations:
                figures.check_failures.append(f"I5 in cycle {cycle}: {sampler.violations[:3]}")
            if cycle < cycles - 1:
                assert agent.terminate() == 0
        agent.env = {}
        writer.stop()
        check_invariants(agent, hub, writer, figures)
        assert not figures.check_failures, figures.check_failures
