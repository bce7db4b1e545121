"""Issue 17 scenarios 1, 3 and 4 as runs with figures: SIGKILL of the agent, the sync
process, the broker and the hub, and the hub's database swapped for an older copy.

Each `run_*(tmp_path, cycles=...)` starts its own broker, hub and agent, keeps a
PacedWriter posting (tests/faults/net_load.py) and an AckSampler watching the cursor
(tests/faults/invariants.py) while it kills, restarts, ends with check_invariants and
returns its Figures. tests/faults/test_kills.py runs them at CI sizes, bench/faults.py at
bench sizes. Kill moments are random (seeded per run, so a failure can be replayed).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from contextlib import ExitStack
from pathlib import Path

from tests.faults.invariants import AckSampler, check_invariants, hub_acked
from tests.faults.net_load import Figures, PacedWriter
from tests.support.broker import Broker
from tests.sync.agents import sync_agent, sync_status
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

SWAP_WITNESS = "a sampler left running through the swaps saw the cursor beyond the hub's ack in"

# A fast supervisor: a killed sync is back within a fraction of a second.
SYNC = {"restart_min_s": 0.1, "restart_max_s": 0.5}


class _Run:
    """Broker, hub, agent, writer and sampler for one scenario run."""

    def __init__(self, tmp_path: Path, events_per_s: float, **sync):
        self.stack = ExitStack()
        try:
            self.broker = self.stack.enter_context(Broker(tmp_path / "broker"))
            self.hub = self.stack.enter_context(HubProcess(tmp_path / "hub", self.broker))
            self.agent = self.stack.enter_context(sync_agent(tmp_path, self.broker, **{**SYNC, **sync}))
            self.sampler = self.stack.enter_context(AckSampler(self.agent, self.hub))
            self.writer = self.stack.enter_context(PacedWriter(self.agent, events_per_s, timeout=3.0))
        except BaseException:
            self.stack.close()    # a half-built run leaves no process behind
            raise

    def __enter__(self) -> "_Run":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def check(self, figures: Figures) -> Figures:
        self.writer.stop()
        check_invariants(self.agent, self.hub, self.writer, figures, sampler=self.sampler)
        figures.notes.append(f"no answer {self.writer.errors}, refused {self.writer.refused or 'none'},"
                             f" I5 samples {self.sampler.samples}")
        return figures


def _acks_grow(writer: PacedWriter, timeout: float = 30.0) -> None:
    n = len(writer.acked)
    wait_until(lambda: len(writer.acked) > n, timeout, "a write to be acknowledged")


def run_agent_kills(tmp_path: Path, cycles: int = 10, seed: int = 1, events_per_s: float = 400.0) -> Figures:
    """SIGKILL the agent (its sync dies with it) at a random moment of writing and draining."""
    figures, rng = Figures("SIGKILL agent"), random.Random(seed)
    with _Run(tmp_path, events_per_s) as run:
        for _ in range(cycles):
            _acks_grow(run.writer)
            time.sleep(rng.uniform(0.0, 0.4))
            killed = time.monotonic()
            run.agent.kill()
            run.agent.start()
            _acks_grow(run.writer)
            figures.recovery_s.append(time.monotonic() - killed)
            figures.cycles += 1
        return run.check(figures)


def run_sync_kills(tmp_path: Path, cycles: int = 10, seed: int = 2, events_per_s: float = 400.0) -> Figures:
    """SIGKILL the sync process at a random moment of a drain; the supervisor restarts it."""
    figures, rng = Figures("SIGKILL sync process"), random.Random(seed)
    with _Run(tmp_path, events_per_s) as run:
        agent = run.agent
        for _ in range(cycles):
            wait_until(lambda: agent.children(), 20, "the sync process to run")
            _acks_grow(run.writer)
            time.sleep(rng.uniform(0.0, 0.4))
            (child,) = agent.children()
            mark = sync_status(agent)["last_seq"]
            killed = time.monotonic()
            os.kill(child, signal.SIGKILL)
            wait_until(lambda: agent.children() and agent.children() != [child], 20, "the sync to be restarted")
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark, 30, "the new sync to ship the backlog")
            figures.recovery_s.append(time.monotonic() - killed)
            figures.cycles += 1
        assert agent.output().count("restarting in") >= cycles, "the supervisor restarted each killed sync"
        return run.check(figures)


def run_broker_kills(tmp_path: Path, cycles: int = 5, seed: int = 3, events_per_s: float = 400.0) -> Figures:
    """SIGKILL the broker mid-stream, restart it on the same port."""
    figures, rng = Figures("SIGKILL broker"), random.Random(seed)
    with _Run(tmp_path, events_per_s) as run:
        agent, broker = run.agent, run.broker
        for _ in range(cycles):
            wait_until(lambda: sync_status(agent)["connected"], 20, "the agent to be connected")
            _acks_grow(run.writer)
            time.sleep(rng.uniform(0.05, 0.4))
            mark = sync_status(agent)["last_seq"]
            killed = time.monotonic()
            broker.kill()
            time.sleep(rng.uniform(0.1, 0.5))    # an outage: the agent keeps appending meanwhile
            broker.start()
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark, 30, "the backlog to be shipped again")
            figures.recovery_s.append(time.monotonic() - killed)
            figures.cycles += 1
        return run.check(figures)


def run_hub_kills(tmp_path: Path, cycles: int = 5, seed: int = 4, events_per_s: float = 400.0) -> Figures:
    """SIGKILL the hub mid-batch (while the agent has a backlog in flight), restart it."""
    figures, rng = Figures("SIGKILL hub"), random.Random(seed)
    with _Run(tmp_path, events_per_s) as run:
        agent, hub = run.agent, run.hub
        for _ in range(cycles):
            wait_until(lambda: (s := sync_status(agent))["acked_seq"] > 0 and s["backlog"] > 0,
                       20, "the hub to be mid-drain")
            time.sleep(rng.uniform(0.0, 0.2))
            mark = sync_status(agent)["last_seq"]
            killed = time.monotonic()
            hub.kill()
            time.sleep(rng.uniform(0.05, 0.3))
            hub.start()
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark, 30, "the backlog to be acked again")
            figures.recovery_s.append(time.monotonic() - killed)
            figures.cycles += 1
        return run.check(figures)


def run_hub_swaps(tmp_path: Path, cycles: int = 3, seed: int = 5, events_per_s: float = 400.0) -> Figures:
    """Stop the hub, replace hub.db by an older copy, start it: the agent rewinds and resends."""
    figures, rng = Figures("hub database swapped for an older copy"), random.Random(seed)
    old = tmp_path / "hub-old.db"
    with _Run(tmp_path, events_per_s) as run:
        agent, hub = run.agent, run.hub
        witness = run.stack.enter_context(AckSampler(agent, hub))   # never paused: it must see the swap
        for cycle in range(cycles):
            _acks_grow(run.writer)
            assert hub.terminate() == 0
            shutil.copy(hub.db_path, old)      # a clean stop checkpointed: hub.db alone is whole
            hub.start()
            older = hub_acked(hub)
            mark = sync_status(agent)["last_seq"]
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark + 50, 30, "the hub to move on")
            time.sleep(rng.uniform(0.0, 0.3))
            run.sampler.pause()               # the hub's ack goes back: the cursor is ahead until the rewind
            assert hub.terminate() == 0
            for suffix in ("-wal", "-shm"):
                hub.db_path.with_name(hub.db_path.name + suffix).unlink(missing_ok=True)
            shutil.copy(old, hub.db_path)
            swapped = time.monotonic()
            hub.start()
            wait_until(lambda: sync_status(agent)["rewinds"] >= cycle + 1, 30, "the agent to rewind")
            figures.notes.append(f"rewound to {older}")
            mark = sync_status(agent)["last_seq"]
            wait_until(lambda: sync_status(agent)["acked_seq"] >= mark, 60, "the agent to resend the lost part")
            run.sampler.resume()
            figures.recovery_s.append(time.monotonic() - swapped)
            figures.cycles += 1
        witness.stop()
        figures.notes.append(f"{SWAP_WITNESS} {len(witness.violations)} samples")
        return run.check(figures)
