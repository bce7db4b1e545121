"""A per-store TCP proxy in front of the broker, so the demo can pull a store's link.

While the link is down the proxy drops the store's open connections and closes new ones
at once: to the agent it looks like a WAN outage, and the agent's own reconnect logic
brings it back once the link is up again.
"""

from __future__ import annotations

import asyncio
import contextlib


class LinkProxy:
    """Forward 127.0.0.1:`port` to the broker at `target_port`; `down()` / `up()` cut and restore."""

    def __init__(self, name: str, target_port: int, port: int = 0):
        self.name = name
        self.target_port = target_port
        self.port = port
        self.is_up = True
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()

    def down(self) -> None:
        """Cut the link: drop every open connection and refuse new ones until `up()`."""
        self.is_up = False
        self._drop_all()

    def up(self) -> None:
        self.is_up = True

    def _drop_all(self) -> None:
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self._pipes.discard(end)
                end.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
