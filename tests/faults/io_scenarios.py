"""Issue 17 scenarios 6 and 9 as runs with figures: EIO, a full disk, a power cut.

tests/faults/test_io.py and test_negative_control.py run them at CI sizes and assert on
the figures; bench/faults.py runs more cycles. See docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from tests.faults.io_inject import InjectEio
from tests.faults.io_power import PowerDisk, no_fsync_env
from tests.faults.net_load import Figures, PacedWriter, integrity, lost_acked
from tests.support.agentproc import AgentProcess, AgentStartError, agent_command
from tests.support.broker import Broker
from tests.sync.agents import assert_healed, sync_agent
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

SYSCALLS = ("pwrite64", "fdatasync")


def wal(agent) -> Path:
    return agent.db_path.with_name(agent.db_path.name + "-wal")


def sync_db(agent) -> Path:
    return agent.db_path.with_name(agent.db_path.stem + ".sync.db")


def check_synced(agent, hub, writer, figures: Figures | None = None) -> int:
    """I1..I6 with a hub: raises AssertionError naming what is wrong; returns the last seq."""
    last = assert_healed(agent, hub)                            # I2 I3 I4 I5
    lost = lost_acked(agent.db_path, writer.acked)               # I1
    if figures is not None:
        figures.events_lost += sum(b - a + 1 for a, b in lost.values())
    assert not lost, f"acknowledged but not in the log: {sorted(lost.items())[:5]}"
    for path in (agent.db_path, sync_db(agent), hub.db_path):   # I6
        assert integrity(path) == "ok", path
    return last


def check_log(agent, acked) -> None:
    """I1, I4, I6 for an agent without a hub: raises AssertionError naming what is wrong."""
    lost = lost_acked(agent.db_path, acked)
    assert not lost, (f"{len(lost)} of {len(acked)} acknowledged commands"
                      f" ({sum(b - a + 1 for a, b in lost.values())} events) are not in the log")
    done = subprocess.run([*agent_command(), "--config", str(agent.config_path), "verify"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert integrity(agent.db_path) == "ok"


def _post_for(writer: PacedWriter, seconds: float) -> tuple[int, int]:
    acked0, refused0 = len(writer.acked), sum(writer.refused.values())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.post_one()
        time.sleep(0.02)
    return len(writer.acked) - acked0, sum(writer.refused.values()) - refused0


def run_eio(tmp_path: Path, cycles: int = 2, fault_s: float = 1.0) -> Figures:
    """EIO on the WAL's pwrite64 and fdatasync in turn, `cycles` times; heal; check."""
    figures = Figures("EIO on write and fsync")
    with ExitStack() as stack:
        broker = stack.enter_context(Broker(tmp_path / "broker"))
        hub = stack.enter_context(HubProcess(tmp_path / "hub", broker))
        agent = stack.enter_context(sync_agent(tmp_path, broker))
        writer = PacedWriter(agent)
        for cycle in range(cycles):
            syscall = SYSCALLS[cycle % 2]
            for _ in range(5):
                assert writer.post_one() == 201
            with InjectEio(agent.proc.pid, wal(agent), syscall) as fault:
                acked, refused = _post_for(writer, fault_s)
            back = time.monotonic()
            assert fault.injected > 0, f"strace failed no {syscall}"
            assert refused > 0, f"no write was refused while {syscall} failed"
            figures.acked_while_faulty += acked
            assert agent.running, "the agent must stay up and refuse, not crash"
            wait_until(lambda: writer.post_one() == 201, 10, f"writes to resume once {syscall} works again")
            figures.recovery_s.append(time.monotonic() - back)
            figures.cycles += 1
        figures.refused = dict(writer.refused)
        figures.notes.append(f"refusal codes {writer.reasons}")
        assert "disk I/O error" in agent.output()
        check_synced(agent, hub, writer, figures)
        figures.events_written = writer.events_acked
    return figures


def run_disk_full(tmp_path: Path, mount: Path, broker, cycles: int = 1, full_s: float = 1.5) -> Figures:
    """The disk under the log and sync.db filled to the last byte while writing; freed; check."""
    from tests.service.test_disk_full import fill
    figures = Figures("disk full")
    (tmp_path / "agent").mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(tmp_path / "agent", db_path=mount / "events.db", wait_connected=True,
                         sections={"mqtt": {"host": broker.host, "port": broker.port,
                                            "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
                                   "sync": {"batch_max_events": 100, "ack_timeout_s": 2.0, "max_inflight": 4},
                                   "storage": {"min_free_mb": 0}, "service": {"backup_interval_s": 0}})
    with HubProcess(tmp_path / "hub", broker) as hub, agent:
        with PacedWriter(agent, events_per_s=2000, batch=100) as writer:
            for _ in range(cycles):
                floor = writer.events_acked
                wait_until(lambda: writer.events_acked > floor + 2000, 20, "writes to flow")
                full = writer.refused.get(507, 0)
                fill(mount / "filler", leave_mb=0)
                wait_until(lambda: writer.refused.get(507, 0) >= full + 3, 20, "507s once the disk is full")
                time.sleep(full_s)   # full for a while: the sync's cursor saves in sync.db meet it too
                assert agent.request("GET", "/v1/stock/SKU-1")[0] == 200, "reads go on"
                (mount / "filler").unlink()
                freed, before = time.monotonic(), len(writer.acked)
                wait_until(lambda: len(writer.acked) > before, 20, "writes to resume")
                figures.recovery_s.append(time.monotonic() - freed)
                figures.cycles += 1
        assert set(writer.refused) <= {507, 503}, writer.refused
        assert "storage_full" in writer.reasons, writer.reasons
        assert agent.running
        figures.refused = dict(writer.refused)
        figures.notes.append("sync restarted by the supervisor: "
                             f"{agent.output().count('restarting in')} time(s)")
        check_synced(agent, hub, writer, figures)
        figures.events_written = writer.events_acked
    return figures


DURABLE, AT_RISK = 10, 40    # commands (20 events each) before the syncfs, and after it


def power_cut_once(workdir: Path, env: dict[str, str]) -> tuple[int, int, str | None]:
    """Write, make the first part durable, write more (all 2xx), cut the power, come back.

    Returns (events acknowledged, events lost, the invariant check's failure or None).
    """
    with PowerDisk(workdir / "disk") as disk:
        (workdir / "agent").mkdir(parents=True)
        agent = AgentProcess(workdir / "agent", db_path=disk.mount / "events.db", env=env,
                             sections={"sync": {"enabled": False}, "storage": {"min_free_mb": 0},
                                       "service": {"backup_interval_s": 0}})
        with agent:
            writer = PacedWriter(agent)
            for _ in range(DURABLE):
                assert writer.post_one() == 201
            # syncfs: what the kernel would have written back by itself by now
            subprocess.run(["sync", "-f", str(disk.mount)], check=True)
            start = time.monotonic()
            for _ in range(AT_RISK):
                assert writer.post_one() == 201
            assert time.monotonic() - start < 10, "too slow: the kernel may write back by itself"
            disk.cut()
            agent.kill()
            disk.reboot()
            agent.env = {}             # a rebooted box, whatever it ran with before
            agent.start()
            assert agent.terminate() == 0
        lost = lost_acked(agent.db_path, writer.acked)
        try:
            check_log(agent, writer.acked)
            failure = None
        except AssertionError as exc:
            failure = str(exc).splitlines()[0]
        return writer.events_acked, sum(b - a + 1 for a, b in lost.values()), failure


def run_power_cut(tmp_path: Path, fsync: bool, cycles: int = 1) -> Figures:
    """`cycles` power cuts, each on a fresh disk, with fsync working or turned off."""
    figures = Figures(f"power cut, fsync {'on' if fsync else 'off (libeatmydata)'}")
    env = {} if fsync else no_fsync_env(tmp_path)
    for cycle in range(cycles):
        for attempt in range(3):
            try:
                written, lost, failure = power_cut_once(tmp_path / f"cut{cycle}-{attempt}", env)
                break
            except AgentStartError as exc:
                # agentproc's free port can be unbindable on a busy machine (another process's
                # TIME-WAIT socket holds it): that cycle is run again on a new disk, and said so.
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                figures.notes.append(f"cycle {cycle} run again: the agent's port was taken")
        figures.events_written += written
        figures.events_lost += lost
        if failure is not None:
            figures.check_failures.append(failure)
        figures.cycles += 1
    return figures
