"""Issue 17 scenario 5: a silent WAN partition of 30 s, a lossy link and a slow link, for real.

The agent and its sync process run in a network namespace behind a router namespace
(tests/faults/net_link.py); the broker and the hub are on the host. One world serves the
module's three faults, one after the other. After each is healed: every 2xx is in the log,
the hub holds 1..last once each and equal to the log, cursor == hub ack == last, verify
passes, integrity_check is ok on every database (tests/faults/net_scenarios.check).
Figures are printed (`-s`) and asserted with wide margins; bench/faults.py runs the same
with longer partitions and more cycles.
"""

import pytest

from tests.faults.net_scenarios import LINK, World, run_lossy, run_partition, run_slow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with World(tmp_path_factory.mktemp("wan")) as running:
        yield running


def test_silent_partition_of_30s_is_detected_then_drains_without_a_reconnect_storm(world):
    f = run_partition(world, seconds=30.0, cycles=1)
    print(f)
    assert f.cycles == 1 and f.events_lost == 0 and f.events_written > 3000
    # Two keepalives without an answer drop the link (paho), plus the status heartbeat.
    assert f.detection_s[0] <= 2 * LINK["keepalive_s"] + 6, f.detection_s
    # Connecting into a blackhole: each attempt waits out its connect timeout (5 s) and
    # backs off; a storm would be many per second.
    assert 1 <= f.connect_attempts[0] <= 12, f.connect_attempts
    assert 1 <= f.broker_connects[0] <= 3, f.broker_connects
    assert f.drain_s[0] < 30, f.drain_s


def test_lossy_link_dropping_20_percent_loses_and_doubles_nothing(world):
    f = run_lossy(world, percent=20, seconds=4.0)
    print(f)
    assert f.events_lost == 0 and f.events_written > 400
    assert f.broker_connects[0] <= 5, f.broker_connects


def test_slow_link_of_256kbit_drains_the_backlog_it_builds(world):
    f = run_slow(world, rate="256kbit", seconds=3.0)
    print(f)
    assert f.events_lost == 0 and f.events_written > 600
    assert f.broker_connects[0] <= 2, f.broker_connects
