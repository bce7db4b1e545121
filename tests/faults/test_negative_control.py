"""Issue 17 scenario 9, the negative control: the checks can fail, and do when fsync lies.

The log lives on an ext4 on a loop device (tests/faults/io_power.py). A few writes are
made durable (syncfs), then more are posted and answered 201, then the power is cut (the
filesystem shut down without flushing), the agent killed, the disk mounted again and the
agent restarted (tests/faults/io_scenarios.power_cut_once). With fsync working nothing
answered 2xx is missing; with fsync turned into a no-op (libeatmydata) the same cut loses
acknowledged events, and the invariant check reports them: "0 lost" means something.
"""

import pytest

from tests.faults.io_scenarios import AT_RISK, DURABLE, run_power_cut

pytestmark = pytest.mark.slow


def test_with_fsync_a_power_cut_loses_nothing_acknowledged(tmp_path):
    f = run_power_cut(tmp_path, fsync=True)
    print(f)
    assert f.events_written == (DURABLE + AT_RISK) * 20
    assert f.events_lost == 0 and f.check_failures == [], f


def test_with_fsync_disabled_the_same_power_cut_loses_acknowledged_events_and_the_check_says_so(tmp_path):
    f = run_power_cut(tmp_path, fsync=False)
    print(f)
    assert f.events_lost >= AT_RISK // 2 * 20, f      # most of what was only in the page cache
    assert len(f.check_failures) == 1 and "are not in the log" in f.check_failures[0], f
