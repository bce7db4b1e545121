"""The hub as a real process under a fake systemd: READY=1, watchdog pings, STOPPING=1."""

import signal

from tests.service.test_process import NotifySocket, WATCHDOG_USEC
from tests.support.broker import Broker
from tests.sync.hubproc import HubProcess


def test_hub_notifies_ready_pings_watchdog_and_stops_cleanly(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with Broker(tmp_path / "broker") as broker:
            hub = HubProcess(tmp_path / "hub", broker)
            hub.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
            try:
                ready = notify.wait_for("READY=1", timeout=10)
                assert any(line.startswith("MAINPID=") for line in ready[-1])
                pings = sum(["WATCHDOG=1" in m for m in notify.wait_for("WATCHDOG=1", timeout=2)])
                for _ in range(3):
                    pings += sum(["WATCHDOG=1" in m for m in notify.wait_for("WATCHDOG=1", timeout=2)])
                assert pings >= 4
                hub.proc.send_signal(signal.SIGTERM)
                notify.wait_for("STOPPING=1", timeout=10)
                assert hub.proc.wait(timeout=15) == 0
            finally:
                if hub.running:
                    hub.kill()
    finally:
        notify.close()
