"""The hub's SQLite: every store's events once each, conflicts, rejections, ack positions.

One sqlite3 connection writes (WAL, synchronous=FULL by default), used only on one thread
of the store's own (`_Writer`); every write is one function run there inside one
transaction. Readers (export, stats, other hub
jobs) use their own read-only connections.

`events` holds each (store_id, seq) once, with the event's raw JSON body as the store
sent it, and `hash`, the store's chain hash at that event as the hub computed it over
that body (NULL where the hub cannot know it). `stores.acked_seq` is the contiguous prefix
1..acked_seq held for the store, written in the same transaction as the events that move
it. Events after a gap are kept and count toward the ack once the gap fills and their
chain checks (sync/hub/anchor.py).

`rejections` keeps the newest `rejections_kept` refused messages (a store can send any
number of bad ones); `rejection_counts` counts every refusal by reason, for ever.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.errors import StorageError, storage_error
from common.sqlite import in_write_transaction, insert_rows
from common import chain
from sync.hub import anchor
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
    hash        BLOB,
    PRIMARY KEY (store_id, seq)
) WITHOUT ROWID;

-- unanchored: batches that carried no chain hash (an older agent); chain_breaks: batches
-- (and held events after a gap) refused because their chain did not continue the hub's.
CREATE TABLE IF NOT EXISTS stores (
    store_id     TEXT PRIMARY KEY,
    acked_seq    INTEGER NOT NULL,
    updated_at   TEXT NOT NULL,
    unanchored   INTEGER NOT NULL DEFAULT 0,
    chain_breaks INTEGER NOT NULL DEFAULT 0
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
-- duplicate key, seqs too far ahead, chain invalid or broken): the newest ones only, see
-- HubStore.rejections_kept.
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
    """One decoded, validated batch for a known store.

    `hashes`: the batch's chain at each event, computed from its `prev_hash` over the
    bodies and already checked against its `hash` (None: the batch carried no hashes).
    """

    store_id: str
    events: list[tuple[EventHead, bytes]]
    prev_hash: bytes | None = None
    hashes: list[bytes] | None = None
    topic: str = ""
    incarnation: int | None = None   # the sender's log incarnation (None: an older agent)


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
    """What one batch did: new events stored, duplicates ignored, conflicts kept out.

    `chain_broken`: why the batch was refused (nothing of it stored), or why the events
    held after a gap that it filled do not count toward the ack; None when its chain held.
    """

    stored: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, held id, sent id)
    new_events: list = field(default_factory=list, repr=False)  # (head, body) of the events stored now
    chain_broken: str | None = None
    unanchored: bool = False
    stale_incarnation: str | None = None   # why the batch was refused (an older incarnation's)


def result_topic(items: list, store_id: str) -> str:
    """The topic of the store's last batch among `items` (for a rejection found by the walk)."""
    return next((i.topic for i in reversed(items) if isinstance(i, Incoming) and i.store_id == store_id), "")


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
                 max_held: dict[str, int], rejections_kept: int = REJECTIONS_KEPT,
                 held_hash: dict[str, bytes | None] | None = None):
        self.path = path
        self.rejections_kept = rejections_kept
        self._db = db
        self._acked = acked
        # The hub's chain hash at each store's ack (None: not known, an unanchored history).
        self._hash = held_hash if held_hash is not None else {}
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

        def setup(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int], dict]:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA_SQL)
            anchor.migrate(conn)
            _migrate_incarnation(conn)
            # A database from before rejection_counts: count what its rejections table holds.
            conn.execute("INSERT INTO rejection_counts(reason, count) SELECT reason, COUNT(*) FROM rejections"
                         " WHERE NOT EXISTS (SELECT 1 FROM rejection_counts) GROUP BY reason")
            known = set(store_ids) | {r[0] for r in conn.execute("SELECT store_id FROM stores")}
            max_held = dict(conn.execute("SELECT store_id, MAX(seq) FROM events GROUP BY store_id"))
            # Every event in the prefix held at the last commit was chain-checked (or taken as
            # unanchored) when the ack first covered it: only the hash at its end is needed.
            acked = {store_id: _walk(conn, store_id, 0) for store_id in sorted(known)}
            return acked, max_held, {s: anchor.hash_at(conn, s, a) for s, a in acked.items()}

        try:
            acked, max_held, held_hash = await db.call(setup, db.conn)
        except sqlite3.Error as exc:
            await db.close()
            raise storage_error("set up hub database", exc) from exc
        return cls(path, db, acked, max_held, rejections_kept, held_hash)

    def acked(self, store_id: str) -> int:
        """Return the store's contiguous prefix (0 when nothing is held)."""
        return self._acked.get(store_id, 0)

    def acked_all(self) -> dict[str, int]:
        return dict(self._acked)

    def held_hash(self, store_id: str) -> bytes | None:
        """Return the hub's chain hash at the store's ack (GENESIS at 0, None when not known)."""
        return self._hash.get(store_id, chain.GENESIS if self.acked(store_id) == 0 else None)

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
            results, acked, max_held, held = await self._db.call(run, self._db.conn)
        except sqlite3.Error as exc:
            raise storage_error("store events", exc) from exc
        self._acked.update(acked)
        self._max.update(max_held)
        self._hash.update(held)
        return results

    def _write(self, conn: sqlite3.Connection, items, now: str):
        results: list[IngestResult | None] = []
        acked: dict[str, int] = {}
        max_held: dict[str, int] = {}
        held: dict[str, bytes | None] = {}
        counts: dict[str, list[int]] = {}  # store -> [unanchored batches, chain breaks] in this group
        walk: dict[str, IngestResult] = {}  # store -> its last result in the group, walked at the end
        new_events: dict[str, list] = {}
        rejected = 0
        for item in items:
            if isinstance(item, Rejection):
                self._reject(conn, now, item.topic, item.store_id, item.reason, item.detail)
                rejected += 1
                results.append(None)
                continue
            store_id = item.store_id
            stale = _stale_incarnation(conn, item)
            if stale is not None:
                self._reject(conn, now, item.topic, store_id, "stale_incarnation", stale)
                rejected += 1
                results.append(IngestResult(stale_incarnation=stale))
                continue
            ack = acked.setdefault(store_id, self._acked.get(store_id, 0))
            top = max_held.setdefault(store_id, self._max.get(store_id, 0))
            known = held.setdefault(store_id, self.held_hash(store_id))
            count = counts.setdefault(store_id, [0, 0])
            first, last = item.events[0][0].seq, item.events[-1][0].seq
            if item.hashes is not None:
                broken = anchor.check(conn, store_id, first, item.prev_hash, item.hashes, ack, known)
                if broken is not None:  # refused whole: nothing stored, the ack stays
                    self._reject(conn, now, item.topic, store_id, "chain_broken", broken)
                    rejected += 1
                    count[1] += 1
                    results.append(IngestResult(chain_broken=broken))
                    continue
            else:
                count[0] += 1
            fast = top == ack and first <= ack + 1 and store_id not in walk
            result, last_hash = self._ingest(conn, item, now, fresh=first > top, known=known if fast else None)
            result.unanchored = item.hashes is None
            results.append(result)
            new_events.setdefault(store_id, []).extend(result.new_events)
            max_held[store_id] = max(top, last)
            if fast:
                if last > ack:
                    acked[store_id], held[store_id] = last, last_hash
            else:
                walk[store_id] = result
        # Once per store for the whole group: a hook can fold a hot SKU's events into one row write.
        for store_id, stored in new_events.items():
            for hook in self.ingest_hooks:
                hook(conn, store_id, stored)
        for store_id, result in walk.items():
            acked[store_id], held[store_id], broken_at = anchor.walk(conn, store_id, acked[store_id], held[store_id])
            if broken_at is not None:
                result.chain_broken = (f"the event held at seq {broken_at} (after a gap) does not continue the"
                                       f" chain at seq {broken_at - 1}: the ack stays at {acked[store_id]}")
                self._reject(conn, now, result_topic(items, store_id), store_id, "chain_broken", result.chain_broken)
                rejected += 1
                counts[store_id][1] += 1
        if rejected:
            # Ids only grow (the newest row is never deleted), so this keeps the newest rows.
            conn.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                         (self.rejections_kept,))
        for store_id, seq in acked.items():
            unanchored, breaks = counts.get(store_id, (0, 0))
            conn.execute("INSERT INTO stores(store_id, acked_seq, updated_at, unanchored, chain_breaks)"
                         " VALUES (?,?,?,?,?) ON CONFLICT(store_id) DO UPDATE SET acked_seq = excluded.acked_seq,"
                         " updated_at = excluded.updated_at, unanchored = unanchored + excluded.unanchored,"
                         " chain_breaks = chain_breaks + excluded.chain_breaks",
                         (store_id, seq, now, unanchored, breaks))
        return results, acked, max_held, held

    @staticmethod
    def _reject(conn: sqlite3.Connection, now: str, topic: str, store_id: str | None, reason: str,
                detail: str) -> None:
        conn.execute("INSERT INTO rejections(received_at, topic, store_id, reason, detail) VALUES (?,?,?,?,?)",
                     (now, topic[:300], store_id, reason, detail[:500]))
        conn.execute("INSERT INTO rejection_counts(reason, count) VALUES (?, 1)"
                     " ON CONFLICT(reason) DO UPDATE SET count = count + 1", (reason,))

    @staticmethod
    def _ingest(conn: sqlite3.Connection, item: Incoming, now: str, fresh: bool,
                known: bytes | None) -> tuple[IngestResult, bytes | None]:
        """Store the batch's new events; return the result and the hub's hash at its last event.

        `known`: the hub's hash at the store's ack when the batch continues the prefix with
        nothing held beyond it (its new events are then exactly ack+1..last, in order), so
        an unanchored batch's hashes can be computed; None otherwise.
        """
        result = IngestResult()
        store_id = item.store_id
        first = item.events[0][0].seq
        if fresh:  # every seq above the highest held: nothing to compare against
            stored = item.events
        else:
            last = item.events[-1][0].seq
            held = dict(conn.execute("SELECT seq, event_id FROM events WHERE store_id = ? AND seq BETWEEN ? AND ?",
                                     (store_id, first, last)))
            stored = []
            for head, body in item.events:
                seen = held.get(head.seq)
                if seen is None:
                    stored.append((head, body))
                elif seen == head.event_id:
                    result.duplicates += 1
                else:
                    result.conflicts.append((head.seq, seen, head.event_id))
                    conn.execute("INSERT OR IGNORE INTO conflicts(store_id, seq, event_id, held_event_id, body,"
                                 " received_at) VALUES (?,?,?,?,?,?)",
                                 (store_id, head.seq, head.event_id, seen, body, now))
        if item.hashes is not None:
            hashes = [item.hashes[head.seq - first] for head, _ in stored]
        elif known is not None:
            hashes = chain.hashes(known, [body for _, body in stored])
        else:
            hashes = [None] * len(stored)
        # The body as a bytearray: sqlite3 binds int, float, str and bytearray as they are, but
        # looks for an adapter for anything else (bytes and msgspec.Raw included), which costs
        # more than the copy (about a fifth of the insert, holding the GIL).
        insert_rows(conn, "INSERT INTO events(store_id, seq, event_id, body, received_at, hash)",
                    [(store_id, head.seq, head.event_id, bytearray(body), now, h)
                     for (head, body), h in zip(stored, hashes)])
        result.stored = len(stored)
        result.new_events = stored
        return result, (hashes[-1] if stored else known)

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


# ------------------------------------------------------------ incarnation
#
# The SQLite hub's record of each store's log incarnation (docs/protocol.md, "Store
# incarnation"): `stores.incarnation` holds the highest one seen; a batch from a lower
# one (the box a restored or replacement box took over from) is refused whole as
# `stale_incarnation`, its sender told the current ack. A minimal version on the
# SQLite store only; the storage layer of sync/hub/storage.py carries the same rule.


def _migrate_incarnation(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(stores)")}
    if "incarnation" not in columns:
        conn.execute("ALTER TABLE stores ADD COLUMN incarnation INTEGER")


def _stale_incarnation(conn: sqlite3.Connection, item: Incoming) -> str | None:
    """Record a batch's higher incarnation; return why it is refused when it is lower."""
    if item.incarnation is None:
        return None
    row = conn.execute("SELECT incarnation FROM stores WHERE store_id = ?", (item.store_id,)).fetchone()
    held = row[0] if row is not None else None
    if held is not None and item.incarnation < held:
        return (f"seqs {item.events[0][0].seq}..{item.events[-1][0].seq} come from incarnation"
                f" {item.incarnation} of the store's log; the hub holds incarnation {held}")
    if held is None or item.incarnation > held:
        conn.execute("INSERT INTO stores(store_id, acked_seq, updated_at, incarnation) VALUES (?, 0, '', ?)"
                     " ON CONFLICT(store_id) DO UPDATE SET incarnation = excluded.incarnation",
                     (item.store_id, item.incarnation))
    return None


# Kept importable from here: the hub's jobs and CLI import it with the store.
from sync.hub.reader import HubReader  # noqa: E402,F401
