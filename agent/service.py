"""Running as a store service: systemd notify/watchdog and the scheduled maintenance jobs.

`run_service(ctx, stop)` is one background task of the composition root. It
- sends READY=1 once the agent is ready (log open, projections current, API bound);
- pings WATCHDOG=1 from the event loop every WATCHDOG_USEC/2, so a blocked loop stops
  the pings and systemd restarts us;
- runs the jobs below on an APScheduler AsyncIOScheduler (coalesced, one instance each,
  misfire grace `service.misfire_grace_s` because a busy till PC can be late);
- sends STOPPING=1 the moment `stop` is set.

Each job is a plain `async def job(ctx)` that tests call directly; the scheduler only
decides when. A failing job is logged once per distinct reason, and once when it recovers.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent import backup
from agent import events as ev
from agent.disk import MIB
from agent.inventory import Refused
from common.notify import Notifier, watchdog_interval, watchdog_pings

log = logging.getLogger("edge_agent.service")

WAL_TRUNCATE_BYTES = 32 * MIB


# ---------------------------------------------------------------------- jobs


async def checkpoint_projections(ctx) -> int:
    """Take a projection checkpoint (fast time travel); return its seq."""
    return await ctx.log.checkpoint_projection()


async def checkpoint_wal(ctx) -> tuple[int, int, int]:
    """Checkpoint the WAL from the writer; truncate it when it has grown past 32 MiB."""
    wal = Path(f"{ctx.log.path}-wal")
    big = wal.exists() and wal.stat().st_size > WAL_TRUNCATE_BYTES
    return await ctx.log.wal_checkpoint("TRUNCATE" if big else "PASSIVE")


async def backup_log(ctx) -> backup.BackupResult:
    """Take a checked backup into storage.backup_dir and keep the newest storage.backup_keep."""
    storage = ctx.config.storage
    return await backup.take_backup(ctx.log, backup.backup_dir(storage.path, storage.backup_dir),
                                    storage.backup_keep, min_free_bytes=storage.min_free_mb * MIB)


async def check_disk(ctx) -> bool:
    """Re-read free space now (logging a transition once); return True when writes are allowed."""
    return True if ctx.disk is None else ctx.disk.refresh()


LEASE_BATCH = 500   # leases released per round of the expiry job (one group commit)


def lease_command_id(reservation_id: str) -> str:
    """The expiry's command id for a reservation: the same on every run, so a retry is a duplicate.

    `lease-expired:{reservation_id}`, or a hash of the id when that would pass the 128
    characters a command id may have.
    """
    cid = f"lease-expired:{reservation_id}"
    if len(cid) <= 128:
        return cid
    return "lease-expired:sha256:" + hashlib.sha256(reservation_id.encode()).hexdigest()


def lease_release(reservation_id: str, expires_at: str) -> ev.AppendCommand:
    """The command that releases an expired lease: reason `expired`, occurred at the lease's end."""
    return ev.AppendCommand(command_id=lease_command_id(reservation_id), events=[
        ev.ReleaseReservation(reservation_id=reservation_id, reason=ev.EXPIRED, occurred_at=expires_at)])


async def expire_leases(ctx) -> int:
    """Release every open lease whose `expires_at` is at or before the agent's clock; return how many.

    Idempotent: each release has its reservation's deterministic command id, so a second
    run, or a run after a crash or restart, appends nothing twice; a lease closed in the
    meantime (fulfilled, released) is refused by decide and skipped, and so is one the
    clock has gone back before (decide refuses reason `expired` before the lease's end).
    """
    released = 0
    while True:
        due = ctx.queries.expired_leases(ctx.now(), LEASE_BATCH)
        # Appended concurrently so the log's writer group-commits them in one transaction.
        results = await asyncio.gather(*(ctx.log.append(lease_release(rid, at)) for rid, at in due),
                                       return_exceptions=True)
        progress = 0
        for (rid, _), result in zip(due, results):
            if isinstance(result, Refused):
                log.info("service: lease %s not released: %s", rid, result.message)
            elif isinstance(result, BaseException):
                raise result
            elif not result.duplicate:
                progress += 1
        released += progress
        # A full round that released something may have left more behind; otherwise done.
        if len(due) < LEASE_BATCH or not progress:
            break
    if released:
        log.info("service: released %d expired lease%s", released, "" if released == 1 else "s")
    return released


def status_line(ctx) -> str:
    """Return the one-line STATUS= text: seq, sync backlog and last ack, disk state."""
    parts = [f"seq {ctx.log.last_seq}"]
    if ctx.config.sync.enabled:
        sync = ctx.sync_status()
        parts.append(f"backlog {sync['backlog']}")
        parts.append(f"last ack {sync['last_ack_at'] or 'never'}")
        parts.append("hub connected" if sync["connected"] else "hub disconnected")
        if sync["alarm"]:
            parts.append(f"ALARM {sync['alarm']['code']}: {sync['alarm']['message']}")
        if sync.get("writes_fenced"):
            parts.append(f"WRITES REFUSED ({sync['writes_fenced']['code']}): {sync['writes_fenced']['message']}")
    else:
        parts.append("sync disabled")
    if ctx.disk is not None and ctx.disk.full:
        parts.append("DISK FULL: writes refused")
    return ", ".join(parts)


async def heartbeat(ctx) -> None:
    """Send STATUS= to systemd (the sync process publishes the store's retained MQTT status itself)."""
    ctx.notifier.send(f"STATUS={status_line(ctx)}")


# ----------------------------------------------------------------- scheduler


def _once(name: str, job: Callable[[Any], Awaitable[Any]], ctx) -> Callable[[], Awaitable[None]]:
    """Wrap a job so a failure is logged once per distinct reason, and its recovery once."""
    last_error: list[str | None] = [None]

    async def run() -> None:
        try:
            await job(ctx)
        except Exception as exc:  # a failed job must not stop the others or the agent
            reason = f"{type(exc).__name__}: {exc}"
            if reason != last_error[0]:
                log.error("service: job %s failed: %s", name, reason)
                last_error[0] = reason
        else:
            if last_error[0] is not None:
                log.warning("service: job %s works again", name)
                last_error[0] = None

    run.__name__ = f"job_{name}"
    return run


def build_scheduler(ctx) -> AsyncIOScheduler:
    """Return a scheduler (not started) with every maintenance job the settings enable."""
    service = ctx.config.service
    scheduler = AsyncIOScheduler(job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": service.misfire_grace_s})
    jobs: list[tuple[str, Callable, float]] = [
        ("projection_checkpoint", checkpoint_projections, service.projection_checkpoint_interval_s),
        ("wal_checkpoint", checkpoint_wal, service.wal_checkpoint_interval_s),
        ("heartbeat", heartbeat, service.heartbeat_interval_s),
        ("disk_check", check_disk, service.disk_check_interval_s),
        ("lease_expiry", expire_leases, service.lease_expiry_interval_s),
    ]
    if service.backup_interval_s > 0:
        jobs.append(("backup", backup_log, service.backup_interval_s))
    for name, job, interval in jobs:
        # The first backup at start, not an interval later: a box that runs has a backup to
        # restore from (docs/operations.md, "Backups and restore").
        first = {"next_run_time": datetime.now(timezone.utc)} if name == "backup" else {}
        scheduler.add_job(_once(name, job, ctx), "interval", seconds=interval, id=name, name=name, **first)
    return scheduler


# ------------------------------------------------------------------- service


async def run_service(ctx, stop: asyncio.Event | None = None, *,
                      notifier: Notifier | None = None, environ: dict | None = None) -> None:
    """Notify systemd and run the scheduled jobs until cancelled (see the module docstring)."""
    notifier = notifier or ctx.notifier
    ctx.notifier = notifier
    while not ctx.ready:
        await asyncio.sleep(0.02)
    scheduler = build_scheduler(ctx)
    scheduler.start()
    notifier.send("READY=1", f"STATUS={status_line(ctx)}", f"MAINPID={os.getpid()}")
    log.info("service: ready at seq %d%s", ctx.log.last_seq,
             " (systemd notified)" if notifier.enabled else "")
    interval = watchdog_interval(environ) if ctx.config.service.watchdog else None
    pinger = asyncio.create_task(watchdog_pings(notifier, interval), name="watchdog") if interval else None
    stopping = False
    try:
        if stop is not None:
            await stop.wait()
            # Tell systemd at once; the composition root then drains HTTP and closes the log.
            notifier.send("STOPPING=1", "STATUS=stopping")
            stopping = True
            scheduler.pause()
        await asyncio.Event().wait()  # until cancelled by the composition root
    finally:
        if not stopping:
            notifier.send("STOPPING=1", "STATUS=stopping")
        if pinger is not None:
            pinger.cancel()
        scheduler.shutdown(wait=False)
