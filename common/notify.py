"""systemd's notify protocol, in a few lines of our own: one datagram to $NOTIFY_SOCKET.

NOTIFY_SOCKET and WATCHDOG_USEC are systemd's handshake with the process, not
configuration, so they are read here rather than in settings. An address starting with
'@' is an abstract socket. Without NOTIFY_SOCKET every send is a no-op, so the agent
runs the same under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("edge_agent.notify")


class Notifier:
    """Send sd_notify messages; never raises (a lost status line must not stop the store)."""

    def __init__(self, address: str | None):
        self.address = address or None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """Return a notifier for $NOTIFY_SOCKET (disabled when it is unset or empty)."""
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send `lines` (e.g. "READY=1", "STATUS=...") as one datagram; return whether it went."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, target)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise log every few seconds
                log.warning("notify: cannot send to NOTIFY_SOCKET %s: %s", self.address, exc)
                self._warned = True
            return False
        return True


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Return the seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when off.

    None when WATCHDOG_USEC is unset or invalid, or when WATCHDOG_PID names another process.
    """
    environ = os.environ if environ is None else environ
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_pings(notifier: Notifier, interval: float) -> None:
    """Send WATCHDOG=1 every `interval` seconds until cancelled.

    Runs on the event loop on purpose: if the loop blocks, the pings stop and systemd
    restarts the service.
    """
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)
