"""The hub's SQLite: every store's events once each, conflicts, rejections, ack positions.

One sqlite3 connection writes (WAL, synchronous=FULL by default), used only on one thread
of the store's own (`_Writer`); every write is one function run there inside one
transaction. Readers (export, stats, other hub
jobs) use their own read-only connections.

`events` holds each (store_id, seq) once, with the event's raw JSON body as the store
sent it. `stores.acked_seq` is the contiguous prefix 1..acked_seq held for the store,
written in the same transaction as the events that move it. Events after a gap are kept
and count toward the ack once the gap fills.

`rejections` keeps the newest `rejections_kept` refused messages (a store can send any
number of bad ones); `rejection_counts` counts every refusal by reason, for ever.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.errors import StorageError, storage_error
from common.sqlite import in_write_transaction, insert_rows, open_readonly
from sync.protocol import EventHead

log = logging.getLogger("edge_hub.store")
T = TypeVar("T")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS events (
    store_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    body        BLOB NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (store_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS stores (
    store_id   TEXT PRIMARY KEY,
    acked_seq  INTEGER NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;

-- Same (store_id, seq) as a held event but another event_id: kept out of `events`.
CREATE TABLE IF NOT EXISTS conflicts (
    store_id      TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    event_id      TEXT NOT NULL,
    held_event_id TEXT NOT NULL,
    body          BLOB NOT NULL,
    received_at   TEXT NOT NULL,
    PRIMARY KEY (store_id, seq, event_id)
) WITHOUT ROWID;

-- Messages refused before anything was stored (undecodable, store mismatch, unknown store,
-- duplicate key, seqs too far ahead): the newest ones only, see HubStore.rejections_kept.
CREATE TABLE IF NOT EXISTS rejections (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic       TEXT NOT NULL,
    store_id    TEXT,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL
);

-- Every refusal ever, by reason (the rejections table keeps only the newest).
CREATE TABLE IF NOT EXISTS rejection_counts (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
) WITHOUT ROWID;
"""

REJECTIONS_KEPT = 10_000

_WALK_CHUNK = 5000


@dataclass(frozen=True)
class Incoming:
    """One decoded, validated batch for a known store."""

    store_id: str
    events: list[tuple[EventHead, bytes]]


@dataclass(frozen=True)
class Rejection:
    """A message refused before storage, to be recorded and counted.

    `restate_ack`: publish the store's current ack after the commit (a refused batch
    of a configured store, so its sender learns where the hub is).
    """

    topic: str
    store_id: str | None
    reason: str
    detail: str
    restate_ack: bool = False


@dataclass
class IngestResult:
    """What one batch did: new events stored, duplicates ignored, conflicts kept out."""

    stored: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, held id, sent id)
    new_events: list = field(default_factory=list, repr=False)  # (head, body) of the events stored now


def _walk(conn: sqlite3.Connection, store_id: str, acked: int) -> int:
    """Return the end of the contiguous run of seqs starting at acked + 1."""
    while True:
        rows = conn.execute("SELECT seq FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                            (store_id, acked, _WALK_CHUNK)).fetchall()
        for (seq,) in rows:
            if seq != acked + 1:
                return acked
            acked = seq
        if len(rows) < _WALK_CHUNK:
            return acked


class _Writer:
    """The writer connection and the one thread that uses it (SQLite's single writer)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-hub-writer")
        self.conn: sqlite3.Connection | None = None

    async def open(self, path: Path) -> None:
        self.conn = await self.call(lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False))

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the writer's thread; return its result (or raise its error)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        if self.conn is not None:
            await self.call(self.conn.close)
            self.conn = None
        self._pool.shutdown(wait=True)


class HubStore:
    """The hub's database. Open with `await HubStore.open(...)`, close with `await close()`."""

    def __init__(self, path: Path, db: _Writer, acked: dict[str, int],
                 max_held: dict[str, int], rejections_kept: int = REJECTIONS_KEPT):
        self.path = path
        self.rejections_kept = rejections_kept
        self._db = db
        self._acked = acked
        # The highest seq held per store. While it equals the ack (nothing held beyond a
        # gap), a batch that continues the prefix moves the ack without a walk or a lookup.
        self._max = max_held
        # fn(conn, store_id, new events) inside the ingest transaction, once per store per
        # group with every event that group stored for it, in arrival order, as (head, body)
        # pairs from `Incoming.events` (the availability projection, sync/hub/projection.py);
        # a raise rolls the whole group back.
        self.ingest_hooks: list[Callable[[sqlite3.Connection, str, list], None]] = []

    @classmethod
    async def open(cls, path: str | Path, store_ids: set[str] | list[str],
                   synchronous: str = "FULL", rejections_kept: int = REJECTIONS_KEPT) -> "HubStore":
        """Open (creating) the database and compute each store's contiguous prefix.

        Raises StorageError when SQLite cannot open or set it up.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sync = synchronous.upper()
        if sync not in ("FULL", "NORMAL", "EXTRA"):
            raise StorageError(f"storage.synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        db = _Writer()
        try:
            await db.open(path)
        except sqlite3.Error as exc:
            await db.close()
            raise storage_error("open hub database", exc) from exc

        def setup(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA_SQL)
            # A database from before rejection_counts: count what its rejections table holds.
            conn.execute("INSERT INTO rejection_counts(reason, count) SELECT reason, COUNT(*) FROM rejections"
                         " WHERE NOT EXISTS (SELECT 1 FROM rejection_counts) GROUP BY reason")
            known = set(store_ids) | {r[0] for r in conn.execute("SELECT store_id FROM stores")}
            max_held = dict(conn.execute("SELECT store_id, MAX(seq) FROM events GROUP BY store_id"))
            return {store_id: _walk(conn, store_id, 0) for store_id in sorted(known)}, max_held

        try:
            acked, max_held = await db.call(setup, db.conn)
        except sqlite3.Error as exc:
            await db.close()
            raise storage_error("set up hub database", exc) from exc
        return cls(path, db, acked, max_held, rejections_kept)

    def acked(self, store_id: str) -> int:
        """Return the store's contiguous prefix (0 when nothing is held)."""
        return self._acked.get(store_id, 0)

    def acked_all(self) -> dict[str, int]:
        return dict(self._acked)

    async def write(self, items: list[Incoming | Rejection], now: str) -> list[IngestResult | None]:
        """Store a group of batches and rejections in one transaction; return one result each.

        Idempotent: a batch stored again only counts duplicates. The in-memory ack
        positions move only after the commit. Raises StorageError (nothing stored).
        """
        def run(conn: sqlite3.Connection):
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = self._write(conn, items, now)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        try:
            results, acked, max_held = await self._db.call(run, self._db.conn)
        except sqlite3.Error as exc:
            raise storage_error("store events", exc) from exc
        self._acked.update(acked)
        self._max.update(max_held)
        return results

    def _write(self, conn: sqlite3.Connection, items, now: str):
        results: list[IngestResult | None] = []
        acked: dict[str, int] = {}
        max_held: dict[str, int] = {}
        walk: set[str] = set()
        new_events: dict[str, list] = {}
        rejected = 0
        for item in items:
            if isinstance(item, Rejection):
                conn.execute("INSERT INTO rejections(received_at, topic, store_id, reason, detail)"
                             " VALUES (?,?,?,?,?)", (now, item.topic[:300], item.store_id, item.reason,
                                                     item.detail[:500]))
                conn.execute("INSERT INTO rejection_counts(reason, count) VALUES (?, 1)"
                             " ON CONFLICT(reason) DO UPDATE SET count = count + 1", (item.reason,))
                rejected += 1
                results.append(None)
                continue
            store_id = item.store_id
            ack = acked.setdefault(store_id, self._acked.get(store_id, 0))
            top = max_held.setdefault(store_id, self._max.get(store_id, 0))
            first, last = item.events[0][0].seq, item.events[-1][0].seq
            results.append(self._ingest(conn, item, now, fresh=first > top))
            new_events.setdefault(store_id, []).extend(results[-1].new_events)
            max_held[store_id] = max(top, last)
            if top == ack and first <= ack + 1 and store_id not in walk:
                acked[store_id] = max(ack, last)
            else:
                walk.add(store_id)
        # Once per store for the whole group: a hook can fold a hot SKU's events into one row write.
        for store_id, stored in new_events.items():
            for hook in self.ingest_hooks:
                hook(conn, store_id, stored)
        if rejected:
            # Ids only grow (the newest row is never deleted), so this keeps the newest rows.
            conn.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                         (self.rejections_kept,))
        for store_id in walk:
            acked[store_id] = _walk(conn, store_id, acked[store_id])
        for store_id, seq in acked.items():
            conn.execute("INSERT INTO stores(store_id, acked_seq, updated_at) VALUES (?,?,?)"
                         " ON CONFLICT(store_id) DO UPDATE SET acked_seq = excluded.acked_seq,"
                         " updated_at = excluded.updated_at", (store_id, seq, now))
        return results, acked, max_held

    @staticmethod
    def _ingest(conn: sqlite3.Connection, item: Incoming, now: str, fresh: bool) -> IngestResult:
        result = IngestResult()
        store_id = item.store_id
        if fresh:  # every seq above the highest held: nothing to compare against
            stored = item.events
        else:
            first, last = item.events[0][0].seq, item.events[-1][0].seq
            held = dict(conn.execute("SELECT seq, event_id FROM events WHERE store_id = ? AND seq BETWEEN ? AND ?",
                                     (store_id, first, last)))
            stored = []
            for head, body in item.events:
                known = held.get(head.seq)
                if known is None:
                    stored.append((head, body))
                elif known == head.event_id:
                    result.duplicates += 1
                else:
                    result.conflicts.append((head.seq, known, head.event_id))
                    conn.execute("INSERT OR IGNORE INTO conflicts(store_id, seq, event_id, held_event_id, body,"
                                 " received_at) VALUES (?,?,?,?,?,?)",
                                 (store_id, head.seq, head.event_id, known, body, now))
        # The body as a bytearray: sqlite3 binds int, float, str and bytearray as they are, but
        # looks for an adapter for anything else (bytes and msgspec.Raw included), which costs
        # more than the copy (about a fifth of the insert, holding the GIL).
        insert_rows(conn, "INSERT INTO events(store_id, seq, event_id, body, received_at)",
                    [(store_id, head.seq, head.event_id, bytearray(body), now) for head, body in stored])
        result.stored = len(stored)
        result.new_events = stored
        return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in its own write transaction on the writer; return its result.

        For other hub modules' durable state. Raises StorageError (rolled back) on SQLite errors.
        """
        try:
            return await self._db.call(in_write_transaction, self._db.conn, fn)
        except sqlite3.Error as exc:
            raise storage_error("hub write", exc) from exc

    async def close(self) -> None:
        await self._db.close()


class HubReader:
    """Read-only queries on the hub's database (export, stats, other hub jobs)."""

    def __init__(self, path: str | Path):
        self.conn = open_readonly(path, f"no hub database at {path} (run `edge-hub run` first)")

    def close(self) -> None:
        self.conn.close()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read hub database", exc) from exc

    def events_after(self, store_id: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Return up to `limit` (seq, raw body) of a store after `after_seq`, in seq order."""
        return self._all("SELECT seq, body FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (store_id, after_seq, limit))

    def iter_bodies(self, store_id: str, after_seq: int = 0, chunk: int = 5000) -> Iterator[bytes]:
        """Yield every held event body of a store in seq order (gaps and all)."""
        while True:
            rows = self.events_after(store_id, after_seq, chunk)
            if not rows:
                return
            for _, body in rows:
                yield body
            after_seq = rows[-1][0]

    def stats(self) -> dict:
        """Return per-store counts (held, max seq, acked, conflicts) and every rejection ever, by reason."""
        stores: dict[str, dict] = {}
        for store_id, held, max_seq in self._all(
                "SELECT store_id, COUNT(*), MAX(seq) FROM events GROUP BY store_id"):
            stores[store_id] = {"events": held, "max_seq": max_seq, "acked_seq": 0, "conflicts": 0}
        for store_id, acked in self._all("SELECT store_id, acked_seq FROM stores"):
            stores.setdefault(store_id, {"events": 0, "max_seq": 0, "conflicts": 0})["acked_seq"] = acked
        for store_id, n in self._all("SELECT store_id, COUNT(*) FROM conflicts GROUP BY store_id"):
            stores.setdefault(store_id, {"events": 0, "max_seq": 0, "acked_seq": 0})["conflicts"] = n
        rejected = dict(self._all("SELECT reason, count FROM rejection_counts"))
        return {"stores": stores, "rejected": rejected}
