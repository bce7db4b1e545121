"""Issue 17 scenarios 7 and 8 as runs with figures: frozen processes and clock jumps.

- `run_freeze_agent`: SIGSTOP the agent (its sync child runs on) while writes go on, with
  NOTIFY_SOCKET and WATCHDOG_USEC set as systemd would: the WATCHDOG=1 pings stop (systemd
  would restart the service after WATCHDOG_USEC), the sync keeps shipping what the log
  holds; SIGCONT heals.
- `run_freeze_sync`: SIGSTOP the sync process: its heartbeat in sync.db stops (GET /v1/sync
  `heartbeat_age_s` grows, `connected` turns false), the agent's pings go on, kiosk reads and writes are served; a short
  freeze heals on SIGCONT, a freeze beyond `sync.stall_after_s` makes the supervisor
  SIGKILL and restart it.
- `run_clock_jumps`: the agent's and sync's wall clock (EDGE_AGENT_TEST_CLOCK_OFFSET_FILE,
  common.clock.ShiftedClock) jumps forward and back while writing; recorded_at goes back
  in the log, ordering and dedup by seq do not care.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.faults.invariants import AckSampler, check_invariants, hub_acked
from tests.faults.kill_scenarios import SYNC
from tests.faults.net_load import Figures, PacedWriter
from tests.support.broker import Broker
from tests.sync.agents import agent_export, sync_agent, sync_status
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

WATCHDOG_USEC = 400_000   # a ping every 0.2 s


class WatchdogPings:
    """The datagram socket systemd would bind; a thread records when each WATCHDOG=1 came."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="watchdog-pings")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.sock.recv(65536).decode()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if "WATCHDOG=1" in message.split("\n"):
                self.pings.append(time.monotonic())

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.pings if start <= t < end)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _served(agent) -> bool:
    """A kiosk's reads: the page, a stock level, a search."""
    return all(agent.request("GET", path, timeout=3)[0] == 200
               for path in ("/", "/v1/stock/SKU-1", "/v1/search?q=SKU"))


def run_freeze_agent(tmp_path: Path, cycles: int = 2, freeze_s: float = 1.5) -> Figures:
    figures = Figures("SIGSTOP agent")
    pings = WatchdogPings(tmp_path / "notify.sock")
    try:
        with Broker(tmp_path / "broker") as broker, HubProcess(tmp_path / "hub", broker) as hub:
            agent = sync_agent(tmp_path, broker, **SYNC)
            agent.env = {"NOTIFY_SOCKET": pings.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
            with agent, PacedWriter(agent, 300, timeout=freeze_s + 5) as writer:
                sampler = AckSampler(agent, hub).start()
                for _ in range(cycles):
                    wait_until(lambda: len(writer.acked) > 3 and pings.between(time.monotonic() - 1, 1e12) >= 3,
                               20, "writes and pings")
                    os.kill(agent.proc.pid, signal.SIGSTOP)
                    stopped = time.monotonic()
                    last = max(b for _, b in writer.acked.values())
                    # the sync process is not frozen: it ships what the log holds
                    wait_until(lambda: hub_acked(hub) >= last, freeze_s + 10, "the sync to ship while the agent is frozen")
                    time.sleep(max(0.0, freeze_s - (time.monotonic() - stopped)))
                    silent = pings.between(stopped + 0.05, time.monotonic())
                    n = len(writer.acked)
                    os.kill(agent.proc.pid, signal.SIGCONT)
                    resumed = time.monotonic()
                    assert silent == 0, f"{silent} watchdog pings from a stopped agent"
                    wait_until(lambda: len(writer.acked) > n and pings.between(resumed, 1e12) > 0, 20,
                               "writes and pings to resume")
                    figures.recovery_s.append(time.monotonic() - resumed)
                    figures.cycles += 1
                writer.stop()
                check_invariants(agent, hub, writer, figures, sampler=sampler)
                figures.notes.append(f"pings {len(pings.pings)}; frozen {freeze_s} s each; no answer {writer.errors}")
    finally:
        pings.close()
    return figures


def run_freeze_sync(tmp_path: Path, cycles: int = 2, freeze_s: float = 1.0, stall_s: float = 2.5) -> Figures:
    figures = Figures("SIGSTOP sync process")
    pings = WatchdogPings(tmp_path / "notify.sock")
    try:
        with Broker(tmp_path / "broker") as broker, HubProcess(tmp_path / "hub", broker) as hub:
            agent = sync_agent(tmp_path, broker, heartbeat_s=0.2, stall_after_s=stall_s, **SYNC)
            agent.env = {"NOTIFY_SOCKET": pings.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
            with agent, PacedWriter(agent, 300) as writer:
                sampler = AckSampler(agent, hub).start()
                for cycle in range(cycles + 1):
                    long = cycle == cycles          # the last freeze outlasts stall_after_s
                    wait_until(lambda: agent.children() and sync_status(agent)["sync_pid"] in agent.children(),
                               20, "the sync process to run")
                    wait_until(lambda: len(writer.acked) > 3, 20, "writes")
                    (child,) = agent.children()
                    os.kill(child, signal.SIGSTOP)
                    stopped = time.monotonic()
                    acked, n = sync_status(agent)["acked_seq"], len(writer.acked)
                    while time.monotonic() - stopped < (stall_s + 3 if long else freeze_s):
                        assert _served(agent), "kiosk reads while the sync is frozen"
                        if long and agent.children() != [child]:
                            break
                        time.sleep(0.1)
                    status = sync_status(agent)
                    during = pings.between(stopped, time.monotonic())
                    assert during >= 3, f"the agent's watchdog pings went on ({during})"
                    assert len(writer.acked) > n + 3, "writes were answered while the sync was frozen"
                    if long:
                        wait_until(lambda: agent.children() and agent.children() != [child], 10,
                                   "the supervisor to replace the stalled sync")
                        os.kill(child, signal.SIGCONT) if os.path.exists(f"/proc/{child}") else None
                        figures.notes.append("a freeze beyond stall_after_s: the supervisor killed and restarted it")
                    else:
                        assert status["acked_seq"] == acked, "a frozen sync ships nothing"
                        assert status["heartbeat_age_s"] >= freeze_s * 0.5 and not status["connected"], status
                        os.kill(child, signal.SIGCONT)
                    resumed, mark = time.monotonic(), sync_status(agent)["last_seq"]
                    wait_until(lambda: sync_status(agent)["acked_seq"] >= mark, 30, "the sync to catch up")
                    figures.recovery_s.append(time.monotonic() - resumed)
                    figures.cycles += 1
                assert sync_status(agent)["sync_stalls"] == 1 and "has not recorded a heartbeat" in agent.output()
                writer.stop()
                check_invariants(agent, hub, writer, figures, sampler=sampler)
    finally:
        pings.close()
    return figures


JUMPS = (3600.0, -3600.0, -86400.0, 7 * 86400.0, 0.0)   # seconds from the real clock


def run_clock_jumps(tmp_path: Path, cycles: int = 1, hold_s: float = 0.7) -> Figures:
    figures = Figures("clock jumps forward and back")
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    with Broker(tmp_path / "broker") as broker, HubProcess(tmp_path / "hub", broker) as hub:
        agent = sync_agent(tmp_path, broker, **SYNC)
        agent.env = {"EDGE_AGENT_TEST_CLOCK_OFFSET_FILE": str(offset)}
        with agent, PacedWriter(agent, 300) as writer:
            sampler = AckSampler(agent, hub).start()
            for _ in range(cycles):
                for jump in JUMPS:
                    n = len(writer.acked)
                    offset.write_text(repr(jump))
                    jumped = time.monotonic()
                    wait_until(lambda: len(writer.acked) > n + 2, 20, "writes after the jump")
                    figures.recovery_s.append(time.monotonic() - jumped)
                    time.sleep(hold_s)
                figures.cycles += 1
            writer.stop()
            check_invariants(agent, hub, writer, figures, sampler=sampler)
            events = agent_export(agent)
            back = sum(1 for a, b in zip(events, events[1:]) if b["recorded_at"] < a["recorded_at"])
            assert back >= cycles, f"the clock went back {back} times in the log"
            figures.notes.append(f"recorded_at went back {back} times; restarts of sync "
                                 f"{agent.output().count('restarting in')}")
    return figures
