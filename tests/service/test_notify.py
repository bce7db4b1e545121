"""sd_notify: datagrams to a path or abstract socket; the watchdog interval from the environment."""

import os
import socket

from common.notify import Notifier, watchdog_interval


def _receiver(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        assert Notifier(path).send("READY=1", "STATUS=seq 3, sync disabled")
        assert sock.recv(4096) == b"READY=1\nSTATUS=seq 3, sync disabled"


def test_notify_supports_abstract_sockets():
    name = f"edge-agent-test-{os.getpid()}"
    with _receiver("\0" + name) as sock:
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_socket_is_a_no_op():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_notify_to_a_missing_socket_does_not_raise(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.send("WATCHDOG=1") is False
    assert notifier.send("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]) == 1


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
