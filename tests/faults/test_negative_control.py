"""Issue 17 scenario 9, the negative control: the checks can fail, and do when fsync lies.

The log lives on an ext4 on a loop device (tests/faults/io_power.py). A few writes are
made durable (syncfs), then more are posted and answered 201, then the power is cut (the
filesystem shut down without flushing), the agent killed, the disk mounted again and the
agent restarted. With fsync working nothing answered 2xx is missing; with fsync turned
into a no-op (libeatmydata) the same cut loses acknowledged events, and the invariant
check reports them: the suite's "0 lost" means something.
"""

import subprocess
import time
from contextlib import contextmanager

import pytest

from tests.faults.io_power import PowerDisk, no_fsync_env
from tests.faults.net_load import PacedWriter, integrity, lost_acked
from tests.support.agentproc import AgentProcess, agent_command

pytestmark = pytest.mark.slow

DURABLE, AT_RISK = 10, 40    # commands (20 events each) before the syncfs, and after it


def verify(agent) -> subprocess.CompletedProcess:
    return subprocess.run([*agent_command(), "--config", str(agent.config_path), "verify"],
                          capture_output=True, text=True, timeout=60)


def check_log(agent, acked) -> None:
    """I1, I4, I6 for an agent without a hub: raises AssertionError naming what is wrong."""
    lost = lost_acked(agent.db_path, acked)
    assert not lost, (f"{len(lost)} of {len(acked)} acknowledged commands"
                      f" ({sum(b - a + 1 for a, b in lost.values())} events) are not in the log")
    done = verify(agent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert integrity(agent.db_path) == "ok"


@contextmanager
def power_loss_run(tmp_path, env):
    """Write, make the first part durable, write more (all 2xx), cut the power, come back.

    Yields (agent, writer) with the disk mounted again and the agent stopped."""
    with PowerDisk(tmp_path / "disk") as disk:
        agent = AgentProcess(tmp_path / "agent", db_path=disk.mount / "events.db", env=env,
                             sections={"sync": {"enabled": False}, "storage": {"min_free_mb": 0},
                                       "service": {"backup_interval_s": 0}})
        (tmp_path / "agent").mkdir()
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
        yield agent, writer


def test_with_fsync_a_power_cut_loses_nothing_acknowledged(tmp_path):
    with power_loss_run(tmp_path, env={}) as (agent, writer):
        assert len(writer.acked) == DURABLE + AT_RISK
        check_log(agent, writer.acked)


def test_with_fsync_disabled_the_same_power_cut_loses_acknowledged_events_and_the_check_says_so(tmp_path):
    with power_loss_run(tmp_path, env=no_fsync_env(tmp_path)) as (agent, writer):
        lost = lost_acked(agent.db_path, writer.acked)
        print(f"fsync disabled: {len(lost)} of {len(writer.acked)} acknowledged commands lost")
        assert len(lost) >= AT_RISK // 2, lost        # most of what was only in the page cache
        with pytest.raises(AssertionError, match="are not in the log"):
            check_log(agent, writer.acked)
