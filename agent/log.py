"""The store's append-only event log in SQLite: the only writer of the agent's database.

One thread of the log's own (`edge-agent-log-writer`) holds the one sqlite3 connection
that writes (WAL). Appends and the log's maintenance (projection checkpoints, WAL
checkpoints, backups) all go through one queue served by that thread, so there is never
a second writer or checkpointer (Debian's SQLite 3.40 is in the range of the WAL-reset
bug). Appends that wait together are group-committed: one transaction, one fsync, and
each caller still gets its own result or its own refusal. The SQL is agent/logstore.py's;
no sqlite3 error leaves this module unmapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent import events as ev
from agent.inventory import Refused
from agent.logstore import (AppendResult, CapsFor, SeenBefore, Tail, checkpoint_projection, command_hash,
                            decide_and_store, init_db, no_caps)
from agent.reader import LogReader
from agent.schema import GENESIS
from common import clock
from common.errors import LogLocked, StorageError, storage_error
from common.sqlite import in_write_transaction

__all__ = ["AppendResult", "SqliteEventLog", "WRITER_THREAD", "command_hash"]

log = logging.getLogger("edge_agent.log")

WRITER_THREAD = "edge-agent-log-writer"


@dataclass
class _Append:
    command: ev.AppendCommand
    body_hash: bytes
    future: asyncio.Future


@dataclass
class _Maintenance:
    """A maintenance step run on the writer; `fn` opens its own transaction if it needs one.

    WAL checkpoints and backups must run outside a transaction: inside one SQLite refuses
    the checkpoint ("table is locked") and backup_step never gets the lock.
    """

    step: str
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future


@dataclass(frozen=True)
class _Failed:
    """A job's error, carried back to its caller (results are otherwise values)."""

    error: BaseException


_STOP = object()
_MAX_INTENTS_PER_TXN = 20_000


class SqliteEventLog:
    """The append-only log, its projections and the single writer.

    Open with `await SqliteEventLog.open(...)`; close with `await log.close()`.
    """

    reader: LogReader

    def __init__(self, path: Path, store_id: str, lock_fd: int, *, checkpoint_every: int,
                 now: Callable[[], str], new_id: Callable[[], str], disk_guard: Callable[[], None] | None,
                 caps_for: CapsFor = no_caps):
        self.path = path
        self._caps_for = caps_for
        self.store_id = store_id
        self._lock_fd = lock_fd
        self._checkpoint_every = checkpoint_every
        self._now = now
        self._new_id = new_id
        self._disk_guard = disk_guard
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: list[Callable[[list[ev.AnyEvent]], None]] = []
        # Returns the Refused every append gets now (status 503), or None: set by the
        # composition root to agent.rehydrate.Rehydrator.refusal; None: never fenced.
        self.write_fence: Callable[[], Refused | None] | None = None
        self._closing = False
        # `_tail` is the writer thread's own; the attributes are the event loop's copy,
        # updated as each commit is answered.
        self._tail: Tail = (0, GENESIS, 0)
        self.last_seq, self._last_hash, self._checkpoint_seq = self._tail
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future = self._loop.create_future()

    @classmethod
    async def open(cls, path: str | os.PathLike, store_id: str, *, synchronous: str = "FULL",
                   checkpoint_every: int = 10_000, now: Callable[[], str] = clock.utc_now,
                   new_id: Callable[[], str] = clock.new_event_id,
                   disk_guard: Callable[[], None] | None = None,
                   caps_for: CapsFor = no_caps) -> "SqliteEventLog":
        """Open (creating if needed) the log at `path` for `store_id` and start its writer.

        `caps_for(skus)` answers the sales caps held for a batch's sold and reserved SKUs;
        the writer thread calls it at decide time, so it must be safe to call from that
        thread and must never raise or block (agent.syncview.HeldCaps).

        Raises LogLocked when another process holds the log for writing, StorageError
        when the file belongs to another store or SQLite cannot open it, ValueError for
        an unknown `synchronous`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        self = cls(path, store_id, lock_fd, checkpoint_every=checkpoint_every, now=now, new_id=new_id,
                   disk_guard=disk_guard, caps_for=caps_for)
        try:
            await self._start(synchronous)
            self.reader = LogReader(path)
        except BaseException:
            self._closing = True
            try:
                with contextlib.suppress(StorageError):  # the open's own error is the one to raise
                    await self._stop_writer()
            finally:
                os.close(lock_fd)
            raise
        return self

    # ------------------------------------------------------------------ writes

    async def append(self, command: ev.AppendCommand) -> AppendResult:
        """Append a command's events, all or none; idempotent by command_id.

        Returns the seqs (with duplicate=True and nothing appended for a command seen
        before with the same body). Raises Refused when the store's rules refuse it or
        the command_id was used with another body (code `command_conflict`), and
        StorageError/StorageFull when SQLite cannot commit; in every raise nothing
        was appended.
        """
        if self._closing:
            raise StorageError("storage: the log is closing")
        if self.write_fence is not None:
            refusal = self.write_fence()
            if refusal is not None:   # the log lacks history the hub holds (agent/rehydrate.py)
                raise refusal
        if self._disk_guard is not None:
            self._disk_guard()
        future = self._loop.create_future()
        self._jobs.put(_Append(command, command_hash(command), future))
        return await future

    def add_listener(self, fn: Callable[[list[ev.AnyEvent]], None]) -> None:
        """Call `fn(events)` on the event loop after every commit that appended events."""
        self._listeners.append(fn)

    # ----------------------------------------------------------- maintenance

    async def checkpoint_projection(self) -> int:
        """Take a projection checkpoint at the current last seq (for fast time travel).

        Returns the checkpoint's seq; a no-op when nothing changed since the last one.
        """
        def run(conn: sqlite3.Connection) -> int:
            seq = in_write_transaction(conn, checkpoint_projection, self._tail, self._now())
            self._tail = (self._tail[0], self._tail[1], seq)
            return seq

        return await self._maintain("projection checkpoint", run)

    async def wal_checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Checkpoint the WAL from the writer connection; returns SQLite's (busy, log, done)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"wal_checkpoint: unknown mode {mode!r}")

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            return tuple(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())

        return await self._maintain(f"wal checkpoint {mode}", run)

    async def backup_to(self, target: str | os.PathLike) -> int:
        """Copy the database with SQLite's online backup API; return the last seq it holds."""
        def run(conn: sqlite3.Connection) -> int:
            dest = sqlite3.connect(target)
            try:
                conn.backup(dest)
                return dest.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            finally:
                dest.close()

        return await self._maintain(f"backup to {target}", run)

    async def append_history(self, rows: list) -> list[ev.AnyEvent]:
        """Append the hub's history `rows` [(seq, body, hash or None)] after the log's end, as they
        are (agent/history.py); return the events appended. Raises HistoryRefused (nothing appended)."""
        from agent.history import append_history

        def run(conn: sqlite3.Connection) -> list[ev.AnyEvent]:
            tail, events = in_write_transaction(conn, append_history, self.store_id, self._tail, rows)
            self._tail = tail
            return events

        events = await self._maintain("append history", run)
        self.last_seq, self._last_hash, self._checkpoint_seq = self._tail
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:
                    log.exception("log: commit listener failed")
        return events

    async def incarnation(self) -> int:
        """The log's incarnation (meta `incarnation`)."""
        from agent.history import incarnation_of
        return await self._maintain("read incarnation", incarnation_of)

    async def bump_incarnation(self) -> int:
        """Raise the log's incarnation by one (`edge-agent rehydrate`); return the new one."""
        from agent.history import incarnation_of, set_incarnation

        def run(conn: sqlite3.Connection) -> int:
            def bump(c: sqlite3.Connection) -> int:
                value = incarnation_of(c) + 1
                set_incarnation(c, value)
                return value
            return in_write_transaction(conn, bump)

        return await self._maintain("bump incarnation", run)

    async def _maintain(self, step: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._closing:
            raise StorageError(f"storage: {step}: the log is closing")
        future = self._loop.create_future()
        self._jobs.put(_Maintenance(step, fn, future))
        return await future

    async def close(self) -> None:
        """Finish queued writes, stop and join the writer, close connections, release the lock.

        Raises StorageError when SQLite could not close the database (the lock is released
        all the same). A second call does nothing.
        """
        if self._closing:
            return
        self._closing = True
        try:
            await self._stop_writer()
        finally:
            self.reader.close()
            os.close(self._lock_fd)

    # ------------------------------------------------------------ the writer

    # The log owns its writer thread because the writer is one function that runs for the
    # life of the log: aiosqlite's public API runs one call at a time on its thread, with
    # a task hop per call. Callers put jobs on a thread-safe queue (which wakes the thread
    # directly) and the thread answers each transaction's callers with one
    # call_soon_threadsafe, so an append costs two thread wake-ups and no task hops.
    # Jobs that arrive while a transaction runs are taken together as the next batch.

    async def _start(self, synchronous: str) -> None:
        opened = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(synchronous, opened), name=WRITER_THREAD)
        self._thread.start()
        self._tail = await opened
        self.last_seq, self._last_hash, self._checkpoint_seq = self._tail

    async def _stop_writer(self) -> None:
        """Have the writer finish the queue and stop; wait for it, then join it."""
        if self._thread is None:
            return
        self._jobs.put(_STOP)
        try:
            await self._stopped
        finally:
            # Even when cancelled: the lock must not be released while the thread writes.
            self._thread.join()

    def _run(self, synchronous: str, opened: asyncio.Future) -> None:
        """The writer thread: open the connection, report the tail, serve until _STOP."""
        conn = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            self._tail = init_db(conn, self.store_id, synchronous)
        except BaseException as exc:
            self._report(opened, _Failed(_map_error(f"open {self.path}", exc)))
        else:
            self._report(opened, self._tail)
            self._serve(conn)
        finally:
            self._report(self._stopped, _close(conn, self.path))

    def _serve(self, conn: sqlite3.Connection) -> None:
        jobs = self._jobs
        while True:
            try:
                pending = [jobs.get(timeout=1.0)]
            except queue.Empty:
                if self._loop.is_closed():  # the program ended without close(): nobody is left to answer
                    log.warning("log: the event loop closed before the log; the writer stops")
                    return
                continue
            pending.extend(_drain(jobs))
            while pending:
                job = pending.pop(0)
                if job is _STOP:
                    left = [j for j in pending + _drain(jobs) if j is not _STOP]
                    if left:
                        self._answer(left, [StorageError("storage: the log closed")] * len(left), [])
                    return
                if isinstance(job, _Maintenance):
                    self._answer([job], [_run_maintenance(conn, job)], [])
                    continue
                batch, count = [job], len(job.command.events)
                while pending and isinstance(pending[0], _Append) and count < _MAX_INTENTS_PER_TXN:
                    nxt = pending.pop(0)
                    batch.append(nxt)
                    count += len(nxt.command.events)
                self._run_appends(conn, batch)

    def _run_appends(self, conn: sqlite3.Connection, batch: list[_Append]) -> None:
        now = self._now()
        args = (self.store_id, self._tail, batch, now, self._new_id, self._checkpoint_every)
        try:
            try:
                results, appended, tail = in_write_transaction(conn, decide_and_store, *args, False, self._caps_for)
            except SeenBefore:
                # The first pass takes every command for new (a retry is rare, and looking
                # each one up costs a random B-tree probe); one was not: roll back and decide
                # the batch again knowing which were seen.
                results, appended, tail = in_write_transaction(conn, decide_and_store, *args, True, self._caps_for)
        except BaseException as exc:
            error = _map_error("append", exc)
            log.error("%s", error)
            self._answer(batch, [error] * len(batch), [])
            return
        self._tail = tail
        self._answer(batch, results, appended)

    def _answer(self, jobs: list, results: list, appended: list[ev.AnyEvent]) -> None:
        """From the writer thread: hand one transaction's outcome to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, jobs, results, appended, self._tail)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _report(self, future: asyncio.Future, result: Any) -> None:
        """From the writer thread: settle one future on the event loop."""
        try:
            self._loop.call_soon_threadsafe(_settle, future, result)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _deliver(self, jobs: list, results: list, appended: list[ev.AnyEvent], tail: Tail) -> None:
        self.last_seq, self._last_hash, self._checkpoint_seq = tail
        for job, result in zip(jobs, results):
            _settle(job.future, result)
        if appended:
            for listener in self._listeners:
                try:
                    listener(appended)
                except Exception:  # a listener's bug must not stop the writer
                    log.exception("log: commit listener failed")


# --------------------------------------------------------------------- helpers


def _lock(path: Path) -> int:
    """Take the log's flock; return its fd. Raises LogLocked when another process holds it."""
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise LogLocked(f"storage: {path} is held by another writer (is edge-agent run active?)") from None
    return lock_fd


def _close(conn: sqlite3.Connection | None, path: Path) -> _Failed | None:
    """Close the writer connection (SQLite checkpoints the WAL if it is the last one)."""
    if conn is None:
        return None
    try:
        conn.close()
    except sqlite3.Error as exc:
        return _Failed(storage_error(f"close {path}", exc))
    return None


def _run_maintenance(conn: sqlite3.Connection, job: _Maintenance) -> Any:
    try:
        return job.fn(conn)
    except BaseException as exc:  # delivered to the caller, the writer keeps going
        return _Failed(_map_error(job.step, exc))


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(result, _Failed):
        future.set_exception(result.error)
    elif isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _drain(jobs: queue.SimpleQueue) -> list:
    """Take every job waiting on the queue now, in order."""
    taken = []
    while True:
        try:
            taken.append(jobs.get_nowait())
        except queue.Empty:
            return taken


def _map_error(step: str, exc: BaseException) -> BaseException:
    if isinstance(exc, (Refused, StorageError)):
        return exc
    if isinstance(exc, sqlite3.Error):
        return storage_error(step, exc)
    return exc
