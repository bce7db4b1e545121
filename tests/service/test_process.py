"""The agent as a real process under a fake systemd: notify, watchdog, SIGSTOP, SIGTERM."""

import os
import signal
import socket
import time
import urllib.request

import pytest

from tests.support.agentproc import AgentProcess
from tests.support.net import free_port

WATCHDOG_USEC = 400_000   # pings every 0.2 s


class NotifySocket:
    """The datagram socket systemd would bind; collects messages as lists of lines."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout: float) -> list[str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(65536).decode().split("\n")
        except (TimeoutError, socket.timeout):
            return None

    def wait_for(self, line: str, timeout: float) -> list[list[str]]:
        """Return the messages up to and including the first holding `line`; fail at the deadline."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.recv(deadline - time.monotonic())
            if message is None:
                break
            seen.append(message)
            if line in message:
                return seen
        pytest.fail(f"no {line} within {timeout}s; got {seen}")

    def drain(self) -> list[list[str]]:
        out = []
        while (message := self.recv(0.001)) is not None:
            out.append(message)
        return out

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _readyz(agent) -> int:
    try:
        with urllib.request.urlopen(agent.url + "/readyz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_ready_watchdog_sigstop_and_sigterm(tmp_path, notify):
    agent = AgentProcess(tmp_path, sections={"sync": {"enabled": False}},
                         env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    agent.port = free_port()
    agent._write_config()
    agent._spawn()
    try:
        before = notify.wait_for("READY=1", timeout=30)
        # READY=1 comes only once /readyz says ready.
        assert _readyz(agent) == 200, agent.output()
        ready = before[-1]
        assert any(line.startswith("STATUS=seq 0") for line in ready), ready
        assert f"MAINPID={agent.proc.pid}" in ready

        # WATCHDOG=1 arrives periodically, from the event loop.
        stamps = []
        deadline = time.monotonic() + 10
        while len(stamps) < 5 and time.monotonic() < deadline:
            message = notify.recv(deadline - time.monotonic())
            if message and "WATCHDOG=1" in message:
                stamps.append(time.monotonic())
        assert len(stamps) == 5, agent.output()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert max(gaps) < 1.0, gaps

        # A stopped process sends no pings: systemd's watchdog would fire.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.05)
            notify.drain()
            assert notify.recv(1.0) is None, "pings went on while the process was stopped"
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        notify.wait_for("WATCHDOG=1", timeout=5)

        # SIGTERM: STOPPING=1, then exit 0.
        agent.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=10)
        assert agent.proc.wait(10) == 0, agent.output()
        assert "<6>" in agent.output()  # journal priority prefixes by default
    finally:
        if agent.running:
            agent.kill()


def test_sigterm_during_writes_stops_within_10s_with_every_ack_kept(tmp_path, notify):
    import concurrent.futures

    agent = AgentProcess(tmp_path, sections={"sync": {"enabled": False}},
                         env={"NOTIFY_SOCKET": notify.path})
    with agent:
        notify.wait_for("READY=1", timeout=10)

        def write(i: int):
            return agent.request("POST", "/v1/events", {"command_id": f"t{i}", "events": [
                {"type": "received", "sku": "A1", "qty": 1}]})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(write, i) for i in range(400)]
            while sum(f.done() for f in futures) < 50:
                time.sleep(0.01)
            started = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            results = [f.result() if not f.exception() else (None, None) for f in futures]
        assert agent.proc.wait(10) == 0, agent.output()
        assert time.monotonic() - started < 10
    acked = sorted(body["first_seq"] for status, body in results if status == 201)
    assert acked and len(acked) >= 50
    assert all(status in (201, 503, None) for status, _ in results), {s for s, _ in results}
    import sqlite3

    seqs = [r[0] for r in sqlite3.connect(tmp_path / "events.db").execute("SELECT seq FROM events ORDER BY seq")]
    assert set(acked) <= set(seqs) and seqs == list(range(1, len(seqs) + 1))
