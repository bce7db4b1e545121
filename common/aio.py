"""Small asyncio helpers shared by the agent and sync."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """Await `aw` for at most `timeout` seconds (None: no limit); raise TimeoutError after.

    Use this, not `asyncio.wait_for`: on Python 3.11 that one swallows a cancellation
    that arrives just as the awaited thing completes (CPython gh-86296, fixed in 3.12),
    so a task looping over it can ignore its own cancel and hang a shutdown. Seen here:
    `edge-agent run` hung after SIGTERM in about 1 stop in 20 during a sync burst, the
    uplink task waiting for its wake-up event.
    """
    async with asyncio.timeout(timeout):
        return await aw
