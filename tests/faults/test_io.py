"""Issue 17 scenario 6: I/O errors on the log's writes and fsyncs, and a full disk, for real.

EIO comes from strace attached to the running agent (tests/faults/io_inject.py), on the
log's WAL file only; the full disk is a small tmpfs holding the log and sync.db. In every
case: writes are refused with a clear 5xx while the storage fails (503
`storage_unavailable`, 507 `storage_full`), never a 2xx without a durable commit; the
agent stays up and writes resume by themselves once the storage answers again; after
healing every 2xx is in the log, the hub holds 1..last once each equal to the log, the
cursor equals the hub's ack, verify passes and integrity_check is ok on every database
(tests/faults/io_scenarios.py; bench/faults.py runs more cycles).
"""

import sqlite3
import uuid

import pytest

from tests.faults.io_inject import InjectEio
from tests.faults.io_scenarios import check_synced, run_disk_full, run_eio, wal
from tests.faults.net_load import PacedWriter
from tests.service.test_disk_full import small_disk  # noqa: F401  (the tmpfs fixture)
from tests.sync.agents import sync_agent
from tests.sync.conftest import broker  # noqa: F401  (a private mosquitto per test)
from tests.sync.hubproc import HubProcess

pytestmark = pytest.mark.slow


def test_eio_on_the_logs_writes_then_its_fsyncs_is_503_never_a_2xx_and_heals(tmp_path):
    f = run_eio(tmp_path, cycles=2, fault_s=1.0)
    print(f)
    assert f.cycles == 2 and f.acked_while_faulty == 0 and f.events_lost == 0
    assert set(f.refused) == {503} and "'storage_unavailable'" in f.notes[0], (f.refused, f.notes)
    assert max(f.recovery_s) < 5, f.recovery_s


def test_fsync_eio_then_a_crash_keeps_every_2xx_and_the_retry_of_the_503_is_stored_once(tmp_path, broker):  # noqa: F811
    """A commit whose fsync fails is answered 503, but its frames did reach the WAL file:
    SQLite's recovery after a crash may find them whole, so a 503 is an outcome the client
    does not know (as for any database whose COMMIT fails), and the contract's answer is the
    retry with the same command_id: stored exactly once, a duplicate answer if the crash
    kept it. Either way every 2xx is in the log and the chain verifies."""
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        writer = PacedWriter(agent)
        for _ in range(10):
            assert writer.post_one() == 201
        command = {"command_id": str(uuid.uuid4()), "events": [{"type": "received", "sku": "EIO-1", "qty": 5}]}
        with InjectEio(agent.proc.pid, wal(agent), "fdatasync"):
            status, body = agent.request("POST", "/v1/events", command)
            assert status == 503 and body["error"]["code"] == "storage_unavailable", body
            agent.kill()                       # the process dies while the disk still fails
        agent.start()
        conn = sqlite3.connect(f"file:{agent.db_path}?mode=ro", uri=True)
        kept = conn.execute("SELECT COUNT(*) FROM events WHERE command_id = ?",
                            (command["command_id"],)).fetchone()[0]
        conn.close()
        print("the 503'd command was found after the crash:", bool(kept))
        status, body = agent.request("POST", "/v1/events", command)   # the client's retry
        assert status in (200, 201), body
        assert body["duplicate"] is bool(kept)
        writer.acked[command["command_id"]] = (body["first_seq"], body["last_seq"])
        check_synced(agent, hub, writer)


def test_disk_full_under_the_log_and_sync_db_is_507_and_heals(tmp_path, broker, small_disk):  # noqa: F811
    f = run_disk_full(tmp_path, small_disk, broker, cycles=1, full_s=1.5)
    print(f)
    assert f.cycles == 1 and f.events_lost == 0 and f.refused.get(507, 0) >= 3, f
    assert max(f.recovery_s) < 5, f.recovery_s
