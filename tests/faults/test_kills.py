"""Issue 17 scenarios 1, 3 and 4: SIGKILL of the agent, of the sync process, of the broker
and of the hub at random moments while writes go on, and the hub's database swapped for an
older copy; after each run I1..I6 hold (tests/faults/invariants.py), with the cursor sampled
against the hub's ack throughout. CI sizes here; bench/faults.py runs the same with more
cycles (tests/faults/kill_scenarios.py).
"""

import pytest

from tests.faults.kill_scenarios import (run_agent_kills, run_broker_kills, run_hub_kills, run_hub_swaps,
                                         run_sync_kills)

pytestmark = pytest.mark.slow


def _clean(f, cycles):
    print(f)
    assert f.cycles == cycles and f.events_written > 0
    assert (f.events_lost, f.duplicates, f.gaps, f.check_failures) == (0, 0, 0, []), f
    assert len(f.recovery_s) == cycles and max(f.recovery_s) < 30, f.recovery_s


def test_agent_sigkilled_at_random_moments_loses_and_doubles_nothing(tmp_path):
    _clean(run_agent_kills(tmp_path, cycles=6), 6)


def test_sync_process_sigkilled_at_random_moments_loses_and_doubles_nothing(tmp_path):
    _clean(run_sync_kills(tmp_path, cycles=6), 6)


def test_broker_sigkilled_mid_stream_and_restarted(tmp_path):
    _clean(run_broker_kills(tmp_path, cycles=3), 3)


def test_hub_sigkilled_mid_batch_and_restarted(tmp_path):
    _clean(run_hub_kills(tmp_path, cycles=3), 3)


def test_hub_database_swapped_for_an_older_copy_rewinds_and_resends(tmp_path):
    f = run_hub_swaps(tmp_path, cycles=2)
    _clean(f, 2)
