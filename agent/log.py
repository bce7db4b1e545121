"""The store's append-only event log in SQLite: the only writer of the agent's database.

One aiosqlite connection writes (WAL). Every write, appends and other modules' state
alike, goes through one queue served by one function running on that connection's
thread, so there is never a second writer or checkpointer (Debian's SQLite 3.40 is in
the range of the WAL-reset bug). Appends that wait together are group-committed: one
transaction, one fsync, and each caller still gets its own result or its own refusal.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import queue
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import aiosqlite

from common import clock
from agent import events as ev
from common.errors import LogLocked, StorageError, storage_error
from agent.inventory import Inventory, Refused, Reservation, Stock, decide_and_apply, skus_touched
from agent.reader import LogReader
from agent.schema import GENESIS, SCHEMA_SQL, apply_pragmas, take_checkpoint
from common.sqlite import in_write_transaction, insert_rows

log = logging.getLogger("edge_agent.log")


@dataclass(frozen=True)
class AppendResult:
    """What an append answered: the seqs, and whether the command had been seen before."""

    command_id: str
    first_seq: int
    last_seq: int
    duplicate: bool
    events: tuple[ev.AnyEvent, ...] = ()


@dataclass
class _Append:
    command: ev.AppendCommand
    body_hash: bytes
    future: asyncio.Future


@dataclass(frozen=True)
class _Failed:
    """A write job's error, carried back to its caller (results are otherwise values)."""

    error: BaseException


@dataclass
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future
    # WAL checkpoints and backups must run outside a transaction: inside one SQLite
    # refuses the checkpoint ("table is locked") and backup_step never gets the lock.
    transaction: bool = True


class _SeenBefore(Exception):
    """A command taken for new is already in `commands` (its transaction must roll back)."""


_STOP = object()
_MAX_INTENTS_PER_TXN = 20_000


def command_hash(command: ev.AppendCommand) -> bytes:
    """Hash a command's canonical body; the same request body always hashes the same."""
    return hashlib.sha256(ev.encode(command)).digest()


class SqliteEventLog:
    """The append-only log, its projections and the single writer.

    Open with `await SqliteEventLog.open(...)`; close with `await log.close()`.
    """

    def __init__(self, path: Path, store_id: str, db: aiosqlite.Connection, lock_fd: int,
                 reader: LogReader, *, checkpoint_every: int, now: Callable[[], str],
                 new_id: Callable[[], str], disk_guard: Callable[[], None] | None):
        self.path = path
        self.store_id = store_id
        self.reader = reader
        self._db = db
        self._lock_fd = lock_fd
        self._checkpoint_every = checkpoint_every
        self._now = now
        self._new_id = new_id
        self._disk_guard = disk_guard
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: list[Callable[[list[ev.AnyEvent]], None]] = []
        self._closing = False
        # (last seq, last hash, checkpoint seq): `_tail` is the writer thread's own,
        # the attributes are the event loop's copy, updated as each commit is answered.
        self._tail: tuple[int, bytes, int] = (0, GENESIS, 0)
        self.last_seq, self._last_hash, self._checkpoint_seq = self._tail
        self._writer: asyncio.Future | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike, store_id: str, *, synchronous: str = "FULL",
                   checkpoint_every: int = 10_000, now: Callable[[], str] = clock.utc_now,
                   new_id: Callable[[], str] = clock.new_event_id,
                   disk_guard: Callable[[], None] | None = None) -> "SqliteEventLog":
        """Open (creating if needed) the log at `path` for `store_id` and start its writer.

        Raises LogLocked when another process holds the log for writing, StorageError
        when the file belongs to another store or cannot be opened.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise LogLocked(f"storage: {path} is held by another writer (is edge-agent run active?)") from None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise storage_error("open", exc) from exc
        self = None
        try:
            await db._execute(lambda: _init_db(db._conn, store_id, synchronous))
            reader = LogReader(path)
            self = cls(path, store_id, db, lock_fd, reader, checkpoint_every=checkpoint_every,
                       now=now, new_id=new_id, disk_guard=disk_guard)
            self._tail = await db._execute(lambda: _tail(db._conn))
            self.last_seq, self._last_hash, self._checkpoint_seq = self._tail
        except BaseException:
            await db.close()
            os.close(lock_fd)
            raise
        self._writer = asyncio.ensure_future(db._execute(self._serve, db._conn))
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
        if self._disk_guard is not None:
            self._disk_guard()
        future = self._loop.create_future()
        self._jobs.put(_Append(command, command_hash(command), future))
        return await future

    async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn(conn)` in its own write transaction on the writer; return its result.

        For other modules' durable state (sync cursor, snapshots). `fn` runs on the
        writer thread: it must not touch asyncio. A raise rolls the transaction back.
        """
        if self._closing:
            raise StorageError("storage: the log is closing")
        return await self._submit(fn, transaction=True)

    def _submit(self, fn: Callable[[sqlite3.Connection], Any], *, transaction: bool) -> asyncio.Future:
        future = self._loop.create_future()
        self._jobs.put(_Write(fn, future, transaction))
        return future

    def add_listener(self, fn: Callable[[list[ev.AnyEvent]], None]) -> None:
        """Call `fn(events)` on the event loop after every commit that appended events."""
        self._listeners.append(fn)

    # The writer: one function that runs on aiosqlite's connection thread for the life
    # of the log. Callers put jobs on a thread-safe queue (which wakes the thread
    # directly) and the thread answers each transaction's callers with one
    # call_soon_threadsafe, so an append costs two thread wake-ups and no task hops.
    # Jobs that arrive while a transaction runs are taken together as the next batch.

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
                if isinstance(job, _Write):
                    self._answer([job], [self._run_write(conn, job)], [])
                    continue
                batch, count = [job], len(job.command.events)
                while pending and isinstance(pending[0], _Append) and count < _MAX_INTENTS_PER_TXN:
                    nxt = pending.pop(0)
                    batch.append(nxt)
                    count += len(nxt.command.events)
                self._run_appends(conn, batch)

    @staticmethod
    def _run_write(conn: sqlite3.Connection, job: _Write) -> Any:
        try:
            if job.transaction:
                return in_write_transaction(conn, job.fn)
            return job.fn(conn)
        except BaseException as exc:  # delivered to the caller, the writer keeps going
            return _Failed(_map_error("write", exc))

    def _run_appends(self, conn: sqlite3.Connection, batch: list[_Append]) -> None:
        now = self._now()
        try:
            try:
                results, appended, tail = in_write_transaction(conn, self._decide_and_store, batch, now, False)
            except _SeenBefore:
                # The first pass takes every command for new (a retry is rare, and looking
                # each one up costs a random B-tree probe); one was not: roll back and decide
                # the batch again knowing which were seen.
                results, appended, tail = in_write_transaction(conn, self._decide_and_store, batch, now, True)
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

    def _deliver(self, jobs: list, results: list, appended: list[ev.AnyEvent],
                 tail: tuple[int, bytes, int]) -> None:
        self.last_seq, self._last_hash, self._checkpoint_seq = tail
        for job, result in zip(jobs, results):
            if job.future.done():
                continue
            if isinstance(result, _Failed):
                job.future.set_exception(result.error)
            elif isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        if appended:
            for listener in self._listeners:
                try:
                    listener(appended)
                except Exception:  # a listener's bug must not stop the writer
                    log.exception("log: commit listener failed")

    def _decide_and_store(self, conn: sqlite3.Connection, batch: list[_Append], now: str, lookup: bool):
        """Decide and store a batch inside the caller's transaction (on the writer thread).

        With `lookup` false, commands are not looked up first: raises _SeenBefore (and the
        caller rolls back) when one turns out to be stored already, and a refused command
        is looked up before its refusal is answered (a retry may be refused now).
        """
        last_seq, last_hash, cp_seq = self._tail
        known = _known(conn, [job.command.command_id for job in batch]) if lookup else {}
        refused: list[int] = []
        state = _load_state(conn, self.store_id, last_seq, [job.command for job in batch])
        new_id, encode, sha256, type_of = self._new_id, ev.encode, hashlib.sha256, ev.type_of
        results: list = []
        rows: list[tuple] = []
        command_rows: list[tuple] = []
        appended: list[ev.AnyEvent] = []
        skus: set[str] = set()
        rids: set[str] = set()
        for job in batch:
            cid = job.command.command_id
            seen = known.get(cid)
            if seen is not None:
                results.append(_repeat(cid, seen, job.body_hash))
                continue
            try:
                decided = decide_and_apply(state, job.command, now, new_id)
            except Refused as refusal:
                refused.append(len(results))
                results.append(refusal)
                continue
            for event, eff in decided:
                body = encode(event)
                last_hash = sha256(last_hash + body).digest()
                rid = getattr(event, "reservation_id", None)
                if rid is not None:
                    rids.add(rid)
                skus.add(eff.sku)
                rows.append((event.seq, event.event_id, cid, type_of(event), event.schema, eff.sku, rid,
                             eff.floor, eff.backroom, eff.reserved, body, last_hash))
            new_events = [event for event, _ in decided]
            first, last = new_events[0].seq, new_events[-1].seq
            known[cid] = (cid, job.body_hash, first, last)
            command_rows.append((cid, job.body_hash, first, last, now))
            appended.extend(new_events)
            results.append(AppendResult(cid, first, last, False, tuple(new_events)))
        if refused and not lookup:
            _answer_refused_retries(conn, batch, refused, results)
        if rows:
            _store(conn, rows, command_rows, state, skus, rids)
        if state.last_seq - cp_seq >= self._checkpoint_every:
            take_checkpoint(conn, cp_seq, state.last_seq, now)
            cp_seq = state.last_seq
        return results, appended, (state.last_seq, last_hash, cp_seq)

    # ----------------------------------------------------------- maintenance

    async def checkpoint_projection(self) -> int:
        """Take a projection checkpoint at the current last seq (for fast time travel).

        Returns the checkpoint's seq; a no-op when nothing changed since the last one.
        """
        def run(conn: sqlite3.Connection) -> int:
            last_seq, _, prev = self._tail
            if last_seq > prev:
                take_checkpoint(conn, prev, last_seq, self._now())
            return last_seq

        def commit_then_record(conn: sqlite3.Connection) -> int:
            seq = in_write_transaction(conn, run)
            self._tail = (self._tail[0], self._tail[1], seq)
            return seq

        self._checkpoint_seq = await self._submit(commit_then_record, transaction=False)
        return self._checkpoint_seq

    async def wal_checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Checkpoint the WAL from the writer connection; returns SQLite's (busy, log, done)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"wal_checkpoint: unknown mode {mode!r}")

        def run(conn: sqlite3.Connection):
            return tuple(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())

        return await self._submit(run, transaction=False)

    async def backup_to(self, target: str | os.PathLike) -> int:
        """Copy the database with SQLite's online backup API; return the last seq it holds."""
        def run(conn: sqlite3.Connection) -> int:
            dest = sqlite3.connect(target)
            try:
                conn.backup(dest)
                return dest.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            finally:
                dest.close()

        return await self._submit(run, transaction=False)

    async def close(self) -> None:
        """Finish queued writes, stop the writer, close connections, release the lock."""
        if self._closing:
            return
        self._closing = True
        self._jobs.put(_STOP)
        if self._writer is not None:
            await self._writer
        try:
            await self._db.close()
        finally:
            self.reader.close()
            os.close(self._lock_fd)


# --------------------------------------------------------------------- helpers


def _init_db(conn: sqlite3.Connection, store_id: str, synchronous: str) -> None:
    apply_pragmas(conn, synchronous)
    conn.executescript(SCHEMA_SQL)
    row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?)", (store_id,))
    elif row[0] != store_id:
        raise StorageError(f"storage: this log belongs to store {row[0]!r}, not {store_id!r}")


def _tail(conn: sqlite3.Connection) -> tuple[int, bytes, int]:
    row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    cp = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM checkpoints").fetchone()[0]
    return (row[0], row[1], cp) if row else (0, GENESIS, cp)


def _drain(jobs: queue.SimpleQueue) -> list:
    """Take every job waiting on the queue now, in order."""
    taken = []
    while True:
        try:
            taken.append(jobs.get_nowait())
        except queue.Empty:
            return taken


def _repeat(cid: str, seen: tuple, body_hash: bytes) -> AppendResult | Refused:
    if seen[1] != body_hash:
        return Refused("command_conflict",
                       f"command_id {cid!r} was already used with a different body", "command_id")
    return AppendResult(cid, seen[2], seen[3], True)


def _answer_refused_retries(conn: sqlite3.Connection, batch: list[_Append], refused: list[int],
                            results: list) -> None:
    """Replace the refusal of each refused command seen before with its repeat answer."""
    seen = _known(conn, [batch[i].command.command_id for i in refused])
    for i in refused:
        cid = batch[i].command.command_id
        if cid in seen:
            results[i] = _repeat(cid, seen[cid], batch[i].body_hash)


def _known(conn: sqlite3.Connection, command_ids: list[str]) -> dict[str, tuple]:
    """Return the stored (command_id, body_hash, first_seq, last_seq) of those command ids."""
    return {row[0]: row for row in _select_in(
        conn, "SELECT command_id, body_hash, first_seq, last_seq FROM commands", "command_id", command_ids)}


def _select_in(conn: sqlite3.Connection, select: str, column: str, values: list[str]) -> sqlite3.Cursor:
    """Run `select` for the rows whose `column` is one of `values` (a one-value list is `=`)."""
    if len(values) == 1:
        return conn.execute(f"{select} WHERE {column} = ?", values)
    return conn.execute(f"{select} WHERE {column} IN (SELECT value FROM json_each(?))", (ev.encode(values),))


def _load_state(conn: sqlite3.Connection, store_id: str, last_seq: int,
                commands: Iterable[ev.AppendCommand]) -> Inventory:
    skus: set[str] = set()
    rids: set[str] = set()
    for command in commands:
        s, r = skus_touched(command)
        skus |= s
        rids |= r
    state = Inventory(store_id, last_seq)
    if rids:
        for rid, sku, qty, status, opened, closed in _select_in(
                conn, "SELECT reservation_id, sku, qty, status, opened_seq, closed_seq FROM reservations",
                "reservation_id", sorted(rids)):
            state.reservations[rid] = Reservation(rid, sku, qty, status, opened, closed)
            skus.add(sku)
    if skus:
        for sku, floor, backroom, reserved, seq in _select_in(
                conn, "SELECT sku, floor, backroom, reserved, last_seq FROM stock", "sku", sorted(skus)):
            state.stock[sku] = Stock(floor, backroom, reserved, seq)
    return state


_EVENT_INSERT = ("INSERT INTO events(seq, event_id, command_id, type, schema, sku, rid, d_floor, d_backroom,"
                 " d_reserved, body, hash)")


def _store(conn: sqlite3.Connection, rows: list[tuple], command_rows: list[tuple],
           state: Inventory, skus: set[str], rids: set[str]) -> None:
    insert_rows(conn, _EVENT_INSERT, rows)
    # executemany for the WITHOUT ROWID tables: a multi-row VALUES insert into them
    # measured slower (64 random command ids: 545 us against 149 us).
    try:
        conn.executemany(
            "INSERT INTO commands(command_id, body_hash, first_seq, last_seq, recorded_at) VALUES (?,?,?,?,?)",
            command_rows)
    except sqlite3.IntegrityError as exc:  # the key is all these rows can break: a command stored before
        raise _SeenBefore from exc
    conn.executemany(
        "INSERT INTO stock(sku, floor, backroom, reserved, last_seq) VALUES (?,?,?,?,?)"
        " ON CONFLICT(sku) DO UPDATE SET floor = excluded.floor, backroom = excluded.backroom,"
        " reserved = excluded.reserved, last_seq = excluded.last_seq",
        [(sku, s.floor, s.backroom, s.reserved, s.last_seq) for sku in skus for s in (state.stock[sku],)])
    if rids:
        conn.executemany(
            "INSERT INTO reservations(reservation_id, sku, qty, status, opened_seq, closed_seq)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(reservation_id) DO UPDATE SET status = excluded.status,"
            " closed_seq = excluded.closed_seq",
            [(r.reservation_id, r.sku, r.qty, r.status, r.opened_seq, r.closed_seq)
             for rid in rids for r in (state.reservations[rid],)])


def _map_error(step: str, exc: BaseException) -> BaseException:
    if isinstance(exc, (Refused, StorageError)):
        return exc
    if isinstance(exc, sqlite3.Error):
        return storage_error(step, exc)
    return exc
