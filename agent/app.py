"""`edge-agent run`, the store's service: its composition root.

settings -> log (events.db, the only writer) -> sync view (sync.db, read-only) -> API ->
sync supervisor -> scheduler, in one TaskGroup. With sync enabled the agent starts
`edge-agent sync` as its child and keeps it running (agent/supervisor.py); the two share
nothing but SQLite files. With sync disabled, or with `--no-sync` (sync under a unit of
its own), this process alone is a complete offline store.

`serve(config, stop)` runs until `stop` is set (SIGTERM/SIGINT in `main`), then shuts
down in order: not ready, stop accepting HTTP and let in-flight requests (and so their
writes) finish, stop the sync child (it publishes the store's offline status), cancel
the scheduler, close the log (which finishes any queued write first).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Callable

from agent import service
from agent.api import start_api
from agent.context import AgentContext
from agent.disk import DiskGuard
from agent.log import SqliteEventLog
from agent.metrics import Metrics, SyncCollector
from agent.rehydrate import Rehydrator
from agent.settings import AgentConfig, agent_clock, sync_db_path
from agent.supervisor import SyncSupervisor
from agent.syncview import HeldCaps, SqliteSyncView
from common.clock import rfc3339
from common.logsetup import setup_logging
from common.notify import Notifier

log = logging.getLogger("edge_agent.app")


async def serve(config: AgentConfig, stop: asyncio.Event | None = None,
                started: Callable[[AgentContext], None] | None = None, *,
                config_path: str | None = None, start_sync: bool = True) -> None:
    """Run the agent until `stop` is set; return after a clean shutdown.

    `started(ctx)` is called once the API is bound and the agent is ready (tests use it
    to learn the bound port). The sync child runs when `sync.enabled` and `start_sync`;
    it gets `--config config_path` (without one, the config through the environment).
    Raises LogLocked/StorageError when the log cannot be opened, OSError when the API
    address cannot be bound; a background task's failure shuts the agent down and
    propagates (in an ExceptionGroup).
    """
    stop = stop or asyncio.Event()
    disk = DiskGuard.for_storage(config.storage.path, config.storage.min_free_mb)
    agent_time = agent_clock()
    held_caps = HeldCaps(sync_db_path(config))
    event_log = await SqliteEventLog.open(
        config.storage.path, config.store.id,
        synchronous=config.storage.synchronous, checkpoint_every=config.storage.checkpoint_every,
        disk_guard=disk, now=lambda: rfc3339(agent_time()), caps_for=held_caps)
    view = SqliteSyncView(sync_db_path(config), max_age_s=config.availability.max_age_s, now=agent_time)
    supervisor = (SyncSupervisor(config, config_path, view)
                  if config.sync.enabled and start_sync else None)
    rehydrator = Rehydrator(event_log, sync_db_path(config), enabled=config.sync.enabled)
    await rehydrator.start()
    event_log.write_fence = rehydrator.refusal   # every append, the lease expiry job's too
    ctx = AgentContext(config=config, log=event_log, queries=event_log.reader, sync=view,
                       metrics=Metrics(), disk=disk, notifier=Notifier.from_environ(),
                       supervisor=supervisor, clock=agent_time, rehydrator=rehydrator)
    ctx.metrics.watch_last_seq(lambda: event_log.last_seq)
    ctx.metrics.registry.register(SyncCollector(ctx.sync_status))
    event_log.add_listener(ctx.metrics.count_events)
    runner = None
    try:
        runner, ctx.api_addresses = await start_api(ctx)
        log.info("api: listening on %s; writes %s", ctx.api_url, _token_note(config))
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(service.run_service(ctx, stop), name="service")]
            if config.sync.enabled:
                background.append(tasks.create_task(rehydrator.run(), name="rehydrate"))
            if supervisor is not None:
                background.append(tasks.create_task(supervisor.run(), name="sync-supervisor"))
            ctx.ready = True
            if started is not None:
                started(ctx)
            await stop.wait()
            log.info("app: stopping (last seq %d)", event_log.last_seq)
            ctx.ready = False
            await runner.cleanup()  # stop accepting; in-flight requests finish their writes
            runner = None
            for task in background:
                task.cancel()
    finally:
        ctx.ready = False
        if runner is not None:
            await runner.cleanup()
        if supervisor is not None:
            await supervisor.stop()
        view.close()
        rehydrator.close()
        await event_log.close()
        held_caps.close()   # after the log: its writer thread is the one that reads it
        log.info("app: log closed at seq %d", event_log.last_seq)


def _token_note(config: AgentConfig) -> str:
    token, source = config.write_token_source()
    return f"need the write token from {source}" if token else "need no token (loopback only)"


def _freeze_startup_heap(ctx: AgentContext) -> None:
    # Once ready, move everything built so far (modules, app, config) out of the
    # collector's reach: a full collection then scans only what the service allocates
    # while it runs, instead of stalling the event loop (and kiosk requests) ~20 ms.
    gc.collect()  # free start-up garbage first: a frozen object is never collected
    gc.freeze()


def main(config: AgentConfig, *, config_path: str | None = None, start_sync: bool = True) -> int:
    """Run `serve` under asyncio with SIGTERM/SIGINT wired to a clean stop; return the exit code."""
    setup_logging(config.log.level, config.log.format)
    if config.sync.enabled and not start_sync:
        log.info("app: sync is enabled but not started here (--no-sync): run edge-agent sync beside it")

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop, started=_freeze_startup_heap, config_path=config_path, start_sync=start_sync)

    asyncio.run(runner())
    return 0
