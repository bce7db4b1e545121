"""The API's listening socket: aiohttp's request handling behind the connection table.

`front_door(ctx)` builds the RequestGuard (agent/guard.py) with its ConnectionTable
(agent/connections.py) from `[api]`; `ApiServer(app, ...)` serves the app with
`loop.create_server(table.factory(runner.server), ...)`, the same call aiohttp's own
TCPSite makes, so nothing private of aiohttp is used. `cleanup()` stops accepting, then
lets aiohttp's runner finish in-flight requests and close the connections.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import TYPE_CHECKING

from aiohttp import web

from agent.connections import AcceptErrorLog, ConnectionLimits, ConnectionTable, connection_budget
from agent.guard import RequestGuard

if TYPE_CHECKING:
    from agent.context import AgentContext
    from agent.metrics import Metrics
    from agent.settings import ApiSection

log = logging.getLogger("edge_agent.api")

# Connections the kernel queues before the agent accepts them (a burst of kiosks and tills).
LISTEN_BACKLOG = 1024
FRONT_DOOR = web.AppKey("front_door", RequestGuard)


def front_door(ctx: "AgentContext", authorize=None) -> RequestGuard:
    """The RequestGuard for `ctx`'s `[api]` settings, with a connection table sized to fit the open-file limit.

    `authorize(request)` is the API's token check (raises ApiError 401/403): the guard runs
    it before reading a write's body.
    """
    api = ctx.config.api
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else nofile
    cap, _ = connection_budget(api.max_connections, LISTEN_BACKLOG, nofile)
    if cap < api.max_connections:
        log.warning("api: api.max_connections is %d but the open-file limit is %d: serving at most %d"
                    " connections (raise LimitNOFILE= to serve more)", api.max_connections, nofile, cap)
    limits = ConnectionLimits(cap, api.header_timeout_s, api.idle_timeout_s)
    table = ConnectionTable(limits, ctx.metrics)
    if ctx.metrics is not None:
        ctx.metrics.watch_connections(lambda: table.open)
    return RequestGuard(api, api.host_names(), ctx.metrics, table, authorize=authorize)


class ApiServer:
    """The app bound to `api.host:api.port`; `start()`, `addresses`, `cleanup()`."""

    def __init__(self, app: web.Application, api: "ApiSection", table: ConnectionTable,
                 metrics: "Metrics | None", backlog: int, *, drain_s: float):
        self.api = api
        self.table = table
        self.metrics = metrics
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        _, self.backlog = connection_budget(api.max_connections, backlog,
                                            1 << 20 if nofile == resource.RLIM_INFINITY else nofile)
        # aiohttp's own keep-alive is only a backstop behind the table's deadlines.
        backstop = max(api.header_timeout_s, api.idle_timeout_s) + 1
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain_s, keepalive_timeout=backstop)
        self._server: asyncio.AbstractServer | None = None
        self._errors: AcceptErrorLog | None = None

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound (nothing left open)."""
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self.table.factory(self.runner.server), self.api.host,
                                                    self.api.port, backlog=self.backlog)
        except BaseException:
            await self.runner.cleanup()
            raise
        self._errors = AcceptErrorLog(loop, self.metrics)
        self._errors.install()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [tuple(sock.getsockname()[:2]) for sock in (self._server.sockets if self._server else ())]

    async def cleanup(self) -> None:
        """Stop accepting; let in-flight requests finish (up to the drain time); close every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.runner.cleanup()
        if self._errors is not None:
            self._errors.uninstall()
            self._errors = None
