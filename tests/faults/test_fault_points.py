"""Issue 17 scenario 2: crashes at the exact points a plain SIGKILL rarely hits, by the
fault points of common/faults.py (EDGE_FAULT_POINT, test builds only): the agent between
the log's commit and the HTTP reply; the sync process between publish and the hub's ack,
and between the ack and the cursor save. After each run I1..I6 hold
(tests/faults/point_scenarios.py, tests/faults/invariants.py).
"""

import os
import subprocess
import sys

import pytest

from tests.faults.point_scenarios import run_agent_point, run_sync_point

pytestmark = pytest.mark.slow


def _clean(f, cycles):
    print(f)
    assert f.cycles == cycles and f.events_written > 0
    assert (f.events_lost, f.duplicates, f.gaps, f.check_failures) == (0, 0, 0, []), f


def test_a_crash_between_commit_and_reply_keeps_the_command_and_the_retry_is_a_duplicate(tmp_path):
    _clean(run_agent_point(tmp_path, cycles=3), 3)


@pytest.mark.parametrize("point", ["sync.after_publish", "sync.before_cursor_save"])
def test_a_sync_crash_around_the_hubs_ack_resends_and_the_hub_stores_once(tmp_path, point):
    _clean(run_sync_point(tmp_path, point, cycles=2), 2)


def test_a_fault_point_fires_only_when_named_and_once_with_a_mark(tmp_path):
    code = "from common import faults; faults.point('a'); faults.point('b'); print('alive')"
    run = lambda **env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, **env}, timeout=30)
    assert run().stdout.strip() == "alive"
    assert run(EDGE_FAULT_POINT="c").stdout.strip() == "alive"
    assert run(EDGE_FAULT_POINT="b").returncode == -9
    assert run(EDGE_FAULT_POINT="a:2").stdout.strip() == "alive"        # passed once only
    mark = tmp_path / "mark"
    assert run(EDGE_FAULT_POINT="a", EDGE_FAULT_MARK=str(mark)).returncode == -9 and mark.exists()
    assert run(EDGE_FAULT_POINT="a", EDGE_FAULT_MARK=str(mark)).stdout.strip() == "alive"
