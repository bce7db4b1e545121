"""Issue 17 scenario 6: I/O errors on the log's writes and fsyncs, and a full disk, for real.

EIO comes from strace attached to the running agent (tests/faults/io_inject.py), on the
log's WAL file only; the full disk is a small tmpfs holding the log and sync.db. In every
case: writes are refused with a clear 5xx while the storage fails (503
`storage_unavailable`, 507 `storage_full`), never a 2xx without a durable commit; the
agent stays up and writes resume by themselves once the storage answers again; after
healing every 2xx is in the log, the hub holds 1..last once each equal to the log, the
cursor equals the hub's ack, verify passes and integrity_check is ok on every database.
"""

import sqlite3
import time
import uuid

import pytest

from tests.faults.io_inject import InjectEio
from tests.faults.net_load import PacedWriter, integrity, lost_acked
from tests.service.test_disk_full import fill, small_disk  # noqa: F401  (the tmpfs fixture)
from tests.support.agentproc import AgentProcess
from tests.sync.agents import assert_healed, sync_agent
from tests.sync.conftest import broker  # noqa: F401  (a private mosquitto per test)
from tests.sync.helpers import STORE, wait_until
from tests.sync.hubproc import HubProcess

pytestmark = pytest.mark.slow


def wal(agent):
    return agent.db_path.with_name(agent.db_path.name + "-wal")


def sync_db(agent):
    return agent.db_path.with_name(agent.db_path.stem + ".sync.db")


def check(agent, hub, writer):
    assert_healed(agent, hub)                                   # I2 I3 I4 I5
    lost = lost_acked(agent.db_path, writer.acked)               # I1
    assert not lost, f"acknowledged but not in the log: {sorted(lost.items())[:5]}"
    for path in (agent.db_path, sync_db(agent), hub.db_path):   # I6
        assert integrity(path) == "ok", path


def refused_while(writer, fault, seconds=1.0):
    """Post through `fault` until it has failed some writes; return the answers' counts."""
    acked0, refused0 = len(writer.acked), sum(writer.refused.values())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.post_one()
        time.sleep(0.02)
    return len(writer.acked) - acked0, sum(writer.refused.values()) - refused0


def test_eio_on_the_logs_writes_then_its_fsyncs_is_503_never_a_2xx_and_heals(tmp_path, broker):  # noqa: F811
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        writer = PacedWriter(agent)
        for syscall in ("pwrite64", "fdatasync"):
            for _ in range(10):
                assert writer.post_one() == 201
            with InjectEio(agent.proc.pid, wal(agent), syscall) as fault:
                acked, refused = refused_while(writer, fault)
            assert fault.injected > 0, f"strace failed no {syscall}"
            assert refused > 0 and acked == 0, (syscall, acked, refused, writer.refused)
            assert set(writer.refused) == {503} and set(writer.reasons) == {"storage_unavailable"}, writer.reasons
            assert agent.running, "the agent must stay up and refuse, not crash"
            wait_until(lambda: writer.post_one() == 201, 10, f"writes to resume once {syscall} works again")
        assert "disk I/O error" in agent.output()
        check(agent, hub, writer)


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
        with InjectEio(agent.proc.pid, wal(agent), "fdatasync", when="1+"):
            cid = str(uuid.uuid4())
            status, body = agent.request("POST", "/v1/events", {"command_id": cid, "events": [
                {"type": "received", "sku": "EIO-1", "qty": 5}]})
            assert status == 503 and body["error"]["code"] == "storage_unavailable", body
            refused_cid = cid
            agent.kill()                       # power stays on, the process dies mid-failure
        agent.start()
        conn = sqlite3.connect(f"file:{agent.db_path}?mode=ro", uri=True)
        resurrected = conn.execute("SELECT COUNT(*) FROM events WHERE command_id = ?", (refused_cid,)).fetchone()[0]
        conn.close()
        print("refused command found after the crash:", bool(resurrected))
        status, body = agent.request("POST", "/v1/events", {"command_id": refused_cid, "events": [
            {"type": "received", "sku": "EIO-1", "qty": 5}]})
        assert status in (200, 201), body      # the client's retry: stored once either way
        assert body["duplicate"] is bool(resurrected)
        writer.acked[refused_cid] = (body["first_seq"], body["last_seq"])
        check(agent, hub, writer)


def test_disk_full_under_the_log_and_sync_db_is_507_and_heals(tmp_path, broker, small_disk):  # noqa: F811
    agent = AgentProcess(tmp_path / "agent", STORE, db_path=small_disk / "events.db", wait_connected=True,
                         sections={"mqtt": {"host": broker.host, "port": broker.port,
                                            "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
                                   "sync": {"batch_max_events": 100, "ack_timeout_s": 2.0, "max_inflight": 4},
                                   "storage": {"min_free_mb": 0}, "service": {"backup_interval_s": 0}})
    (tmp_path / "agent").mkdir()
    with HubProcess(tmp_path / "hub", broker) as hub, agent:
        with PacedWriter(agent, events_per_s=2000, batch=100) as writer:
            wait_until(lambda: writer.events_acked > 2000, 20, "writes to flow")
            fill(small_disk / "filler", leave_mb=0)
            wait_until(lambda: writer.refused.get(507, 0) >= 3, 20, "507s once the disk is full")
            time.sleep(1.5)   # full for a while: the sync's cursor saves in sync.db meet it too
            assert agent.request("GET", "/v1/stock/SKU-1")[0] == 200, "reads go on"
            (small_disk / "filler").unlink()
            before = len(writer.acked)
            wait_until(lambda: len(writer.acked) > before + 3, 20, "writes to resume")
        print("disk full: answers refused", writer.refused, writer.reasons, "acked", len(writer.acked))
        assert set(writer.refused) <= {507, 503}, writer.refused
        assert "storage_full" in writer.reasons, writer.reasons
        assert agent.running
        # sync.db on the same disk: the sync process exits on a failed cursor save and the
        # agent's supervisor restarts it (from its last durable cursor); check() sees it heal.
        print("sync restarted:", "edge-agent sync" in agent.output() and "restarting in" in agent.output())
        check(agent, hub, writer)
