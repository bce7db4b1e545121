"""A private mosquitto for tests: a free loopback port, a generated config, kill and restart.

    broker = Broker(tmp_path)        # picks a free port (bind to port 0, then release it)
    broker.start()                   # waits until the port accepts connections
    broker.kill()                    # SIGKILL, like a crash
    broker.start()                   # same port, same config
    broker.stop()                    # SIGTERM

`Broker.start` fails (or skips outside CI) through `require_binary("mosquitto")` when
mosquitto is not installed. `extra_conf` lines are appended to the generated config.

`tls=TlsListener(ca, cert, key, ...)` adds a TLS listener on 127.0.0.1:`broker.tls_port`
(its own free port) beside the plain one: `require_certificate` asks clients for a
certificate signed by `ca`, `identity_as_username` makes its CN the username (what the
ACL's `%u` patterns see). Certificates come from scripts/certs (tests/support/certs.py).
The pytest fixture `broker` lives in tests/sync/conftest.py; other suites can do the same:

    @pytest.fixture
    def broker(tmp_path):
        with Broker(tmp_path / "broker") as b:
            yield b
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_binary
from tests.support.net import free_port


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until 127.0.0.1:port accepts a TCP connection; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener's files and rules (see the module docstring)."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False
    identity_as_username: bool = False
    extra: str = ""   # more lines for this listener, e.g. "use_username_as_clientid true\n"

    def conf(self, port: int) -> str:
        return (f"listener {port} 127.0.0.1\n"
                f"cafile {self.ca}\ncertfile {self.cert}\nkeyfile {self.key}\n"
                f"require_certificate {str(self.require_certificate).lower()}\n"
                + ("use_identity_as_username true\n" if self.identity_as_username else "") + self.extra)


class Broker:
    """One mosquitto process on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 tls: TlsListener | None = None, anonymous: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else 0
        self.host = "127.0.0.1"
        self.conf = self.workdir / "mosquitto.conf"
        self.logfile = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Run as the test's user: as root, mosquitto would drop to `mosquitto`, which cannot
            # read tmp_path (its log, the TLS keys).
            "user root\n"
            "set_tcp_nodelay true\n"
            f"allow_anonymous {str(anonymous).lower()}\n"
            "persistence false\n"
            # Large enough that a test's backlog never overflows a session's queue.
            "max_queued_messages 100000\n"
            "max_inflight_messages 64\n"
            f"log_dest file {self.logfile}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + extra_conf
            # Listener options bind to the listener above them: the TLS one comes last.
            + ("\n" + tls.conf(self.tls_port) if tls is not None else ""))

    def start(self, timeout: float = 10.0) -> "Broker":
        """Start mosquitto (again) on this broker's port and wait until it listens."""
        binary = require_binary("mosquitto")
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
            try:
                wait_port(self.port, max(0.5, deadline - time.monotonic()), self.proc)
                if self.tls_port:
                    wait_port(self.tls_port, max(0.5, deadline - time.monotonic()), self.proc)
                return self
            except RuntimeError:
                # The old socket may still be closing right after a kill: retry until the deadline.
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mosquitto could not listen on {self.port}: {self.proc.stderr.read().decode()}")
                time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the broker (a crash) and reap it."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM the broker and wait for it to exit."""
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
