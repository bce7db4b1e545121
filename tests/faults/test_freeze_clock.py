"""Issue 17 scenarios 7 and 8: a frozen agent and a frozen sync process (SIGSTOP) under a
fake systemd's notify socket, and wall-clock jumps forward and back while writing; after
each run I1..I6 hold (tests/faults/freeze_scenarios.py, tests/faults/invariants.py).
"""

import pytest

from tests.faults.freeze_scenarios import run_clock_jumps, run_freeze_agent, run_freeze_sync

pytestmark = pytest.mark.slow


def _clean(f, cycles):
    print(f)
    assert f.cycles == cycles and f.events_written > 0
    assert (f.events_lost, f.duplicates, f.gaps, f.check_failures) == (0, 0, 0, []), f


def test_a_frozen_agent_stops_its_watchdog_pings_while_sync_ships_and_sigcont_heals(tmp_path):
    _clean(run_freeze_agent(tmp_path, cycles=2), 2)


def test_a_frozen_sync_stops_its_heartbeat_while_the_agent_serves_and_is_restarted_when_stalled(tmp_path):
    _clean(run_freeze_sync(tmp_path, cycles=1), 2)


def test_clock_jumps_forward_and_back_change_neither_order_nor_dedup(tmp_path):
    _clean(run_clock_jumps(tmp_path, cycles=1), 1)
