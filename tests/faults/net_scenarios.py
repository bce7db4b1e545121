"""Issue 17 scenario 5: the store's WAN partitioned, lossy and slow, with figures.

Each `run_*` takes a `World` (namespaces, broker, hub, agent inside the store's namespace;
one world serves several runs), writes through the fault, heals, checks the invariants
and returns its figures; tests/faults/test_network.py runs them at CI sizes,
bench/faults.py at bench sizes.

The sync's link settings are a store operator's for a WAN (docs/reliability.md): MQTT
keepalive 10 s (a dead link is noticed within two keepalives), ack timeout 5 s,
reconnect back-off 0.5..5 s.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from pathlib import Path

from tests.faults.net_link import StoreNetwork
from tests.faults.net_load import Figures, PacedWriter, integrity, lost_acked
from tests.support.agentproc import AgentProcess
from tests.support.broker import Broker
from tests.support.net import free_port
from tests.sync.agents import assert_healed, sync_status
from tests.sync.helpers import STORE, wait_until
from tests.sync.hubproc import HubProcess

TOKEN = "fault-token-0042"
LINK = {"keepalive_s": 10, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0}
SYNC = {"batch_max_events": 200, "ack_timeout_s": 5.0, "max_inflight": 4}


class StoreAgent(AgentProcess):
    """An agent run inside the store's namespace; its API is reached over the store's LAN."""

    def __init__(self, workdir: Path, net: StoreNetwork, broker_port: int, **sync):
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, STORE, write_token=TOKEN, launcher=net.launcher, wait_connected=True,
                         sections={"api": {"host": net.lan_ip, "write_rate_per_s": 0.0},
                                   "mqtt": {"host": net.broker_ip, "port": broker_port, "allow_plaintext": True, **LINK},
                                   "sync": {**SYNC, **sync}, "service": {"backup_interval_s": 0}})
        self.lan_ip = net.lan_ip

    @property
    def url(self) -> str:
        return f"http://{self.lan_ip}:{self.port}"

    @property
    def sync_db(self) -> Path:
        return self.db_path.with_name(self.db_path.stem + ".sync.db")


class World:
    """Network, broker (listening on the host's WAN address), hub (loopback) and agent."""

    def __init__(self, tmp_path: Path, **sync):
        self._stack = ExitStack()
        try:
            self.net = self._stack.enter_context(StoreNetwork())
            self.wan_port = free_port()
            self.broker = self._stack.enter_context(Broker(
                tmp_path / "broker", extra_conf=f"listener {self.wan_port} {self.net.broker_ip}\n"))
            self.hub = self._stack.enter_context(HubProcess(tmp_path / "hub", self.broker))
            self.agent = self._stack.enter_context(StoreAgent(tmp_path / "agent", self.net, self.wan_port, **sync))
        except BaseException:
            self._stack.close()   # a half-built world leaves no namespace or route behind
            raise

    def broker_connects(self) -> int:
        """CONNECTs the broker accepted from the store so far (its notice log)."""
        text = self.broker.logfile.read_text(errors="replace") if self.broker.logfile.exists() else ""
        return len(re.findall(rf"New client connected from {re.escape(self.net.store_wan_ip)}:", text))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def link_down(agent) -> bool:
    s = sync_status(agent)
    return not s["connected"] or s.get("alarm") is not None


def check(world: World, writer: PacedWriter, figures: Figures, verify: bool = True) -> None:
    """The invariants after healing (I1..I6 as tests/sync/agents.assert_healed and the log read back)."""
    last = assert_healed(world.agent, world.hub, verify=verify)   # I2 I3 I4 I5
    lost = lost_acked(world.agent.db_path, writer.acked)           # I1
    figures.events_lost += sum(b - a + 1 for a, b in lost.values())
    assert not lost, f"{len(lost)} acknowledged commands are not in the log: {sorted(lost.items())[:5]}"
    for path in (world.agent.db_path, world.agent.sync_db, world.hub.db_path):   # I6
        assert integrity(path) == "ok", path
    figures.events_written = writer.events_acked
    figures.notes.append(f"log at seq {last}")


def _drain(agent, timeout: float) -> float:
    start = time.monotonic()
    wait_until(lambda: (s := sync_status(agent))["backlog"] == 0 and s["acked_seq"] == s["last_seq"],
               timeout, "the backlog to drain")
    return time.monotonic() - start


def run_partition(world: World, seconds: float = 30.0, cycles: int = 1, events_per_s: float = 200.0) -> Figures:
    """A silent partition of `seconds` while writes go on; heal; measure; check."""
    figures = Figures("partition")
    agent, net = world.agent, world.net
    try:
        with PacedWriter(agent, events_per_s) as writer:
            for _ in range(cycles):
                time.sleep(1.0)   # writes flowing and acked before the cut
                attempts0, connects0 = net.connect_attempts(world.wan_port), world.broker_connects()
                net.partition()
                cut = time.monotonic()
                wait_until(lambda: link_down(agent), seconds + 60, "the agent to see the link down")
                figures.detection_s.append(time.monotonic() - cut)
                left = seconds - (time.monotonic() - cut)
                assert left > 0, f"detected only after {time.monotonic() - cut:.1f}s, beyond the partition"
                time.sleep(left)
                assert sync_status(agent)["backlog"] > 0, "writes went on during the partition"
                attempts = net.connect_attempts(world.wan_port) - attempts0
                net.heal()
                healed = time.monotonic()
                wait_until(lambda: sync_status(agent)["connected"], 60, "the agent to reconnect")
                wait_until(lambda: (s := sync_status(agent))["acked_seq"] >= s["last_seq"] - 100, 120,
                           "the backlog to drain")
                figures.drain_s.append(time.monotonic() - healed)
                figures.connect_attempts.append(attempts)
                figures.broker_connects.append(world.broker_connects() - connects0)
                figures.cycles += 1
    finally:
        net.heal()
    check(world, writer, figures)
    figures.notes.append(f"writes refused during the run: {writer.refused or 'none'}")
    return figures


def run_lossy(world: World, percent: int = 20, seconds: float = 4.0, events_per_s: float = 200.0) -> Figures:
    """`percent` % random drop on the WAN for `seconds` while writing; clear; check."""
    figures = Figures(f"lossy {percent}%")
    agent, net = world.agent, world.net
    connects0, dropped0 = world.broker_connects(), net.dropped()
    try:
        with PacedWriter(agent, events_per_s) as writer:
            net.lossy(percent)
            time.sleep(seconds)
            dropped = net.dropped() - dropped0
            lag = sync_status(agent)
            writer.stop()
            figures.drain_s.append(_drain(agent, 120))   # still lossy: TCP retransmits get it through
    finally:
        net.clear()
    assert dropped > 0, "the lossy rule dropped nothing"
    figures.broker_connects.append(world.broker_connects() - connects0)
    figures.notes.append(f"packets dropped {dropped}; backlog when writes stopped {lag['backlog']}")
    check(world, writer, figures)
    figures.cycles = 1
    return figures


def run_slow(world: World, rate: str = "256kbit", seconds: float = 3.0, events_per_s: float = 300.0) -> Figures:
    """The WAN shaped to `rate` (tbf) while writing faster than it carries; drain; check."""
    figures = Figures(f"slow {rate}")
    agent, net = world.agent, world.net
    connects0 = world.broker_connects()
    net.slow(rate)
    try:
        with PacedWriter(agent, events_per_s) as writer:
            time.sleep(seconds)
        backlog = sync_status(agent)["backlog"]
        figures.drain_s.append(_drain(agent, 180))   # through the shaped link
    finally:
        net.clear()
    figures.broker_connects.append(world.broker_connects() - connects0)
    figures.notes.append(f"backlog when writes stopped {backlog}")
    check(world, writer, figures)
    figures.cycles = 1
    return figures
