"""The composition root: settings -> log -> API -> sync -> scheduler, one TaskGroup.

`serve(config)` runs the agent until `stop` is set (SIGTERM/SIGINT in `main`), then shuts
down in order: stop accepting HTTP, let in-flight writes finish, stop sync, close the log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from agent.log import SqliteEventLog
from agent.settings import AgentConfig

log = logging.getLogger("edge_agent.app")


@dataclass
class AgentContext:
    """What handlers, sync and scheduled jobs share. Optional parts are None until wired."""

    config: AgentConfig
    log: SqliteEventLog
    ready: bool = False
    metrics: Any = None        # agent.metrics.Metrics
    uplink: Any = None         # sync.uplink.Uplink (issue: sync upstream)
    snapshots: Any = None      # agent.snapshots.SnapshotStore (issue: availability)
    extras: dict[str, Any] = field(default_factory=dict)


async def serve(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run the agent until `stop` is set; return after a clean shutdown."""
    stop = stop or asyncio.Event()
    event_log = await SqliteEventLog.open(
        config.storage.path, config.store.id,
        synchronous=config.storage.synchronous, checkpoint_every=config.storage.checkpoint_every)
    ctx = AgentContext(config=config, log=event_log)
    try:
        async with asyncio.TaskGroup() as tasks:
            # Wiring points, in start order: HTTP API, uplink, downlink, scheduler, notifier.
            ctx.ready = True
            await stop.wait()
            for task in list(tasks._tasks):  # noqa: SLF001 - cancel our own long-running tasks
                task.cancel()
    finally:
        await event_log.close()


def main(config: AgentConfig) -> int:
    """Run `serve` under asyncio with SIGTERM/SIGINT wired to a clean stop; return the exit code."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(runner())
    return 0
