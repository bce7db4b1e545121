"""The local API's connections: a cap below the file limit, header-read and idle timeouts.

`ConnectionTable(limits, metrics)` is the protocol factory's bookkeeping. `table.factory(
make_handler)` returns the factory `loop.create_server` is given: for each accepted
connection it wraps one of aiohttp's request handlers (`runner.server()`) in a
`_Connection`, a plain asyncio.Protocol that passes every callback on and adds:

* a deadline. A connection owes its first request's headers within `header_timeout_s`
  of being accepted, and a later request's within `header_timeout_s` of that request's
  first byte; between requests it may sit idle for `idle_timeout_s`. Past its deadline
  it is closed (`edge_agent_http_connections_closed_total{reason}`). While a request is
  being handled (RequestGuard marks its start and end) no deadline runs: a live event
  stream is a request that never ends.
* a cap. At most `max_connections` are open. One more accepted closes the connection
  that has waited longest for its next request (`evicted`): an idle keep-alive or a
  client still sending headers gives way to a new client, so idle sockets can never lock
  the kiosk out. With every connection busy, the new one is answered 503 and closed at
  once (`over_capacity`).

So the process holds at most `max_connections` sockets plus two accept bursts (the listen
backlog) while displaced ones close, and `connection_budget` fits that under the open-file
limit.
`AcceptErrorLog` is the loop's exception handler for the one failure that can be left:
asyncio reports an EMFILE from accept() once per pending connection; it is logged once
per interval with a count, and counted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

from agent.api_errors import error_body
from common.logsetup import LogLimiter

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger("edge_agent.api")

# File descriptors kept for the agent itself: its SQLite files (events.db, WAL, shm, for
# the writer and the reader), sync.db, the sync child's pipes, the event loop's own.
FD_RESERVE = 128
MIN_CONNECTIONS = 16

_BUSY_BODY = error_body("too_many_connections", "the agent is serving as many connections as it may; retry shortly")
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class ConnectionLimits(NamedTuple):
    max_connections: int
    header_timeout_s: float
    idle_timeout_s: float


def connection_budget(max_connections: int, backlog: int, nofile: int) -> tuple[int, int]:
    """Return (connections, backlog) that fit under `nofile` open files with FD_RESERVE to spare.

    One loop tick accepts up to `backlog` connections, and the connections they displace
    close a tick later, while the next burst is being accepted: the peak is connections +
    2 * backlog + the reserve. When both do not fit, the backlog gives way first (down to
    a sixth of the limit), then the cap (never below MIN_CONNECTIONS).
    """
    usable = nofile - FD_RESERVE
    backlog = max(1, min(backlog, max((usable - max_connections) // 2, usable // 6)))
    connections = max(MIN_CONNECTIONS, min(max_connections, usable - 2 * backlog))
    return connections, backlog


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's handler inside, with a deadline and a place in the table."""

    __slots__ = ("table", "inner", "transport", "busy", "reading", "deadline", "closing")

    def __init__(self, table: "ConnectionTable", inner: asyncio.Protocol):
        self.table = table
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.reading = True          # a new connection owes its first request
        self.closing = False
        self.deadline: asyncio.TimerHandle | None = None
        table._admit(self)

    # asyncio.Protocol, passed on to aiohttp's handler
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.table._made(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and not self.reading:
            self.reading = True
            self._arm(self.table.limits.header_timeout_s, "header_timeout")
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.table._forget(self)
        self.inner.connection_lost(exc)

    # deadlines
    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self.deadline = self.table.loop.call_later(seconds, self.close, reason)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def close(self, reason: str) -> None:
        """Close for `reason` (counted); a connection without a transport yet is only forgotten."""
        self.deadline = None
        if self.closing:
            return
        self.closing = True
        self.table._closed_by_us(self, reason)
        if self.transport is None:
            self.table._forget(self)
        else:
            self.transport.close()


class _Refused(asyncio.Protocol):
    """A connection over the cap with every slot busy: one 503, then closed."""

    def connection_made(self, transport) -> None:
        transport.write(BUSY_RESPONSE)
        transport.close()


class ConnectionTable:
    """The API's open connections in the order they last became idle; see the module docstring."""

    def __init__(self, limits: ConnectionLimits, metrics: "Metrics | None" = None):
        self.limits = limits
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[_Connection, None] = {}    # not busy, oldest first: eviction order
        self._open: set[_Connection] = set()            # admitted and not closed by us
        self._by_transport: dict[object, _Connection] = {}

    @property
    def open(self) -> int:
        return len(self._open)

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Return the protocol factory for `loop.create_server` (call from inside the loop)."""
        self.loop = asyncio.get_running_loop()

        def accept() -> asyncio.Protocol:
            if len(self._open) >= self.limits.max_connections:
                victim = next(iter(self._waiting), None)
                if victim is None:
                    self._count("over_capacity")
                    return _Refused()
                victim.close("evicted")
            return _Connection(self, make_handler())
        return accept

    # called by RequestGuard around every request
    def request_started(self, transport) -> _Connection | None:
        conn = self._by_transport.get(transport)
        if conn is not None:
            conn.busy, conn.reading = True, False
            conn._disarm()
            self._waiting.pop(conn, None)
        return conn

    def request_finished(self, conn: _Connection) -> None:
        conn.busy = False
        if conn.closing or conn.transport is None or conn.transport.is_closing():
            return
        self._waiting[conn] = None
        conn._arm(self.limits.idle_timeout_s, "idle_timeout")

    # called by _Connection
    def _admit(self, conn: _Connection) -> None:
        self._open.add(conn)
        self._waiting[conn] = None
        conn._arm(self.limits.header_timeout_s, "header_timeout")

    def _made(self, conn: _Connection) -> None:
        self._by_transport[conn.transport] = conn

    def _closed_by_us(self, conn: _Connection, reason: str) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        self._count(reason)
        log.debug("api: closed a connection: %s", reason)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_connection_closed(reason)


_ACCEPT_FAILURE = "socket.accept() out of system resource"


class AcceptErrorLog:
    """The loop's exception handler: an accept() out of files is logged once per interval, the rest as before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: "Metrics | None" = None,
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.metrics = metrics
        self.clock = clock
        self.previous = loop.get_exception_handler()
        self._quiet = LogLimiter()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if context.get("message") != _ACCEPT_FAILURE or not isinstance(exc, OSError):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        if self.metrics is not None:
            self.metrics.count_accept_error(errno.errorcode.get(exc.errno, str(exc.errno)))
        held = self._quiet.admit("accept", self.clock())
        if held is not None:
            more = f"; {held} more since the last report" if held else ""
            log.error("api: cannot accept a connection: %s (the open-file limit is too low for"
                      " api.max_connections; accepting again in 1 s)%s", exc.strerror or exc, more)

    def install(self) -> None:
        self.loop.set_exception_handler(self)

    def uninstall(self) -> None:
        self.loop.set_exception_handler(self.previous)
