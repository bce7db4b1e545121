"""The composition root: settings -> log -> API -> sync -> scheduler, one TaskGroup.

`serve(config, stop)` runs the agent until `stop` is set (SIGTERM/SIGINT in `main`),
then shuts down in order: not ready, stop accepting HTTP and let in-flight requests
(and so their writes) finish, cancel the background tasks (sync, scheduler), close the
log (which finishes any queued write first).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine

from agent import service
from agent.api import start_api
from agent.disk import DiskGuard
from agent.log import SqliteEventLog
from common.logsetup import setup_logging
from agent.metrics import Metrics
from agent.proc import realtime_main_thread
from agent.settings import AgentConfig
from agent.snapshots import SnapshotStore

log = logging.getLogger("edge_agent.app")


@dataclass
class AgentContext:
    """What handlers, sync and scheduled jobs share. Optional parts are None until wired.

    `uplink`: an object with `status() -> dict` (the GET /v1/sync answer) and `async run()`.
    `snapshots`: an object with `answer(sku) -> (nearby list, online int | None, meta | None)`,
    all read from one snapshot, and `meta() -> dict | None` (the held snapshot's version and age).
    """

    config: AgentConfig
    log: SqliteEventLog
    ready: bool = False
    metrics: Metrics | None = None
    uplink: Any = None         # sync.uplink.Uplink (issue: sync upstream)
    snapshots: Any = None      # agent.snapshots.SnapshotStore (issue: availability)
    api_addresses: list[tuple[str, int]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The API's base URL, e.g. http://127.0.0.1:8080 (valid once serving)."""
        host, port = self.api_addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(config: AgentConfig, stop: asyncio.Event | None = None,
                started: Callable[[AgentContext], None] | None = None,
                sync_worker: Any = None) -> None:
    """Run the agent until `stop` is set; return after a clean shutdown.

    `started(ctx)` is called once the API is bound and the agent is ready (tests use it
    to learn the bound port). `sync_worker`: a `sync.worker.WorkerProcess` forked before
    the loop started (`main` does); the uplink then runs there. Without it the uplink
    runs in this process. Raises LogLocked/StorageError when the log cannot be
    opened, OSError when the API address cannot be bound; a background task's failure
    shuts the agent down and propagates (in an ExceptionGroup).
    """
    stop = stop or asyncio.Event()
    disk = DiskGuard.for_storage(config.storage.path, config.storage.min_free_mb)
    event_log = await SqliteEventLog.open(
        config.storage.path, config.store.id,
        synchronous=config.storage.synchronous, checkpoint_every=config.storage.checkpoint_every,
        disk_guard=disk)
    ctx = AgentContext(config=config, log=event_log, metrics=Metrics())
    ctx.extras["disk"] = disk
    ctx.metrics.watch_last_seq(lambda: event_log.last_seq)
    event_log.add_listener(ctx.metrics.count_events)
    # Wiring point: build ctx.uplink / ctx.snapshots here, before the API answers.
    if config.sync.enabled and sync_worker is not None:
        from sync.worker import SyncWorker  # the downlink subscribes on ctx.uplink.mqtt

        ctx.uplink = await SyncWorker.open(config, event_log, sync_worker, metrics=ctx.metrics)
    elif config.sync.enabled:
        from sync.uplink import Uplink

        ctx.uplink = await Uplink.open(config, event_log, metrics=ctx.metrics)
    ctx.snapshots = await SnapshotStore.open(event_log, max_age_s=config.availability.max_age_s)
    ctx.extras["catalog"] = ctx.snapshots.catalog
    if ctx.uplink is not None:
        from sync.downlink import Downlink

        Downlink(ctx.uplink.mqtt, config.mqtt.topic_prefix, config.store.id, ctx.snapshots,
                 metrics=ctx.metrics).attach()
        ctx.uplink.snapshot_version = lambda: ctx.snapshots.version
        if sync_worker is not None:  # snapshots are applied there: no apply process of their own
            ctx.snapshots.run_elsewhere = ctx.uplink.call
    runner = None
    try:
        runner, ctx.api_addresses = await start_api(ctx)
        log.info("api: listening on %s", ctx.api_url)
        async with asyncio.TaskGroup() as tasks:
            background: list[asyncio.Task] = []

            def start(name: str, coro: Coroutine[Any, Any, Any]) -> None:
                background.append(tasks.create_task(coro, name=name))

            # Wiring points, in start order, one `start(...)` line each:
            # uplink, downlink, scheduler, notifier.
            if ctx.uplink is not None:
                start("uplink", ctx.uplink.run())
            start("service", service.run_service(ctx, stop))  # scheduler, sd_notify, watchdog

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
        if ctx.snapshots is not None:
            ctx.snapshots.close()
        await event_log.close()
        log.info("app: log closed at seq %d", event_log.last_seq)


def _freeze_startup_heap() -> None:
    gc.collect()  # free start-up garbage first: a frozen object is never collected
    gc.freeze()


MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX would); True when glibc took it.

    glibc gives threads their own arenas (up to 8 per core), and the writer, paho and the
    uplink's reader threads each keep freed memory in theirs: with 2 arenas the agent's
    peak RSS under load was 56-60 MiB instead of 62.6-63.3 MiB (bench/footprint.py).
    Must run before the threads start. Elsewhere than glibc it does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        return libc.mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        return False


_M_ARENA_MAX = -8  # glibc's malloc.h


def main(config: AgentConfig) -> int:
    """Run `serve` under asyncio with SIGTERM/SIGINT wired to a clean stop; return the exit code."""
    limit_malloc_arenas()
    setup_logging(config.log.level, config.log.format)
    log.info("app: the event loop runs under %s", realtime_main_thread())
    worker = None
    if config.sync.enabled:
        # The uplink and the MQTT client get a process of their own (sync/worker.py),
        # forked now: no thread runs yet, and it shares the imported modules.
        from sync.worker import fork_worker

        worker = fork_worker()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Once ready, move everything built so far (modules, app, config) out of the collector's
        # reach: a full collection then scans only what the service allocates while it runs,
        # instead of stalling the event loop ~20 ms (kiosk requests with it) while the uplink
        # reads a backlog and triggers collections.
        await serve(config, stop, started=lambda ctx: _freeze_startup_heap(), sync_worker=worker)

    asyncio.run(runner())
    return 0
