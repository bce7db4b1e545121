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
import secrets
import sqlite3
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, TypeVar

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.errors import StorageError, storage_error
from common.sqlite import in_write_transaction, insert_rows, open_readonly
from common import chain
from sync.hub import anchor, migrations
from sync.hub.storage import iter_bodies, result_topic, stale_detail, walk_broken_detail  # noqa: F401
from sync.hub.storage import (REJECTIONS_KEPT, AckState, IngestHook, IngestResult, Incoming, Rejection,  # noqa: F401
                              Upsert, WriteResults)

log = logging.getLogger("edge_hub.store")
T = TypeVar("T")

# Migration 1's tables as one script (tools and tests that build a bare hub database).
SCHEMA_SQL = ";\n".join(migrations._SQLITE_V1) + ";\n"

_WALK_CHUNK = 5000


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


class SqliteStorage:
    """The hub's SQLite database (`HubStorage`, sync/hub/storage.py). Open with
    `await SqliteStorage.open(...)`, close with `await close()`.

    The hub process is the database's only writer, so each store's ack, revision,
    incarnation, highest seq and chain hash at the ack are kept in memory beside it,
    loaded at open and moved only after each commit.
    """

    def __init__(self, path: Path, db: _Writer, state: dict, rejections_kept: int = REJECTIONS_KEPT):
        self.path = path
        self.rejections_kept = rejections_kept
        self._db = db
        self._reader: _Writer | None = None
        self._acked: dict[str, int] = state["acked"]
        # The hub's chain hash at each store's ack (None: not known, an unanchored history).
        self._hash: dict[str, bytes | None] = state["hash"]
        # The highest seq held per store. While it equals the ack (nothing held beyond a
        # gap), a batch that continues the prefix moves the ack without a walk or a lookup.
        self._max: dict[str, int] = state["max"]
        self._rev: dict[str, int] = state["rev"]
        self._inc: dict[str, int | None] = state["inc"]
        # One process writes in commit order: only a reopen can find a record that went back.
        self._epoch = "s" + secrets.token_hex(8)
        # hook(store_id, new events) inside the ingest transaction (sync/hub/storage.py).
        self.ingest_hooks: list[IngestHook] = []
        # Fold hub_stock_pending into the projection once it holds this many rows (set by
        # the availability side: `fn(conn)` runs in the ingest transaction). None: never here.
        self.pending_fold: tuple[int, Callable[[sqlite3.Connection], object]] | None = None

    @classmethod
    async def open(cls, path: str | Path, store_ids: Iterable[str],
                   synchronous: str = "FULL", rejections_kept: int = REJECTIONS_KEPT) -> "SqliteStorage":
        """Open (creating, migrating) the database and compute each store's contiguous prefix.

        Raises StorageError when SQLite cannot open or set it up.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sync = synchronous.upper()
        if sync not in ("FULL", "NORMAL", "EXTRA"):
            raise StorageError(f"storage.synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        store_ids = set(store_ids)
        db = _Writer()
        try:
            await db.open(path)
        except sqlite3.Error as exc:
            await db.close()
            raise storage_error("open hub database", exc) from exc

        def setup(conn: sqlite3.Connection) -> dict:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute("PRAGMA busy_timeout=5000")
            migrations.migrate_sqlite(conn)
            held = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT store_id, ack_rev, incarnation FROM stores")}
            known = store_ids | set(held)
            max_held = dict(conn.execute("SELECT store_id, MAX(seq) FROM events GROUP BY store_id"))
            # Every event in the prefix held at the last commit was chain-checked (or taken as
            # unanchored) when the ack first covered it: only the hash at its end is needed.
            acked = {store_id: _walk(conn, store_id, 0) for store_id in sorted(known)}
            return {"acked": acked, "max": max_held,
                    "hash": {s: anchor.hash_at(conn, s, a) for s, a in acked.items()},
                    "rev": {s: r[0] for s, r in held.items()}, "inc": {s: r[1] for s, r in held.items()}}

        try:
            state = await db.call(setup, db.conn)
        except sqlite3.Error as exc:
            await db.close()
            raise storage_error("set up hub database", exc) from exc
        return cls(path, db, state, rejections_kept)

    # ------------------------------------------------------------------ acks

    def acked_now(self, store_id: str) -> int:
        """The store's contiguous prefix (0 when nothing is held), without waiting."""
        return self._acked.get(store_id, 0)

    async def acked(self, store_id: str) -> int:
        return self._acked.get(store_id, 0)

    def _state(self, store_id: str) -> AckState:
        return AckState(self._acked.get(store_id, 0), self._rev.get(store_id, 0), self._epoch)

    async def ack_state(self, store_id: str) -> AckState:
        return self._state(store_id)

    async def ack_states(self, store_ids: Iterable[str]) -> dict[str, AckState]:
        return {store_id: self._state(store_id) for store_id in store_ids}

    async def epoch(self) -> str:
        return self._epoch

    def acked_all(self) -> dict[str, int]:
        return dict(self._acked)

    def held_hash(self, store_id: str) -> bytes | None:
        """Return the hub's chain hash at the store's ack (GENESIS at 0, None when not known)."""
        return self._hash.get(store_id, chain.GENESIS if self.acked_now(store_id) == 0 else None)

    # ---------------------------------------------------------------- ingest

    async def write(self, items: list[Incoming | Rejection], now: str) -> WriteResults:
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
            results, acked, max_held, held, revs, incs = await self._db.call(run, self._db.conn)
        except sqlite3.Error as exc:
            raise storage_error("store events", exc) from exc
        self._acked.update(acked)
        self._max.update(max_held)
        self._hash.update(held)
        self._rev.update(revs)
        self._inc.update(incs)
        named = {i.store_id for i in items if isinstance(i, Incoming) or (i.restate_ack and i.store_id)}
        return WriteResults(results, {store_id: self._state(store_id) for store_id in named})

    def _write(self, conn: sqlite3.Connection, items, now: str):
        results: list[IngestResult | None] = []
        acked: dict[str, int] = {}
        max_held: dict[str, int] = {}
        held: dict[str, bytes | None] = {}
        incs: dict[str, int | None] = {}
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
            ack = acked.setdefault(store_id, self._acked.get(store_id, 0))
            top = max_held.setdefault(store_id, self._max.get(store_id, 0))
            known = held.setdefault(store_id, self.held_hash(store_id))
            inc = incs.setdefault(store_id, self._inc.get(store_id))
            count = counts.setdefault(store_id, [0, 0])
            first, last = item.events[0][0].seq, item.events[-1][0].seq
            if item.incarnation is not None and inc is not None and item.incarnation < inc:
                detail = stale_detail(first, last, item.incarnation, inc)
                self._reject(conn, now, item.topic, store_id, "stale_incarnation", detail)
                rejected += 1
                results.append(IngestResult(stale_incarnation=detail))
                continue
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
            if item.incarnation is not None:
                incs[store_id] = item.incarnation
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
        pending = 0
        for store_id, stored in new_events.items():
            if stored:
                for hook in self.ingest_hooks:
                    pending += apply_hook_output(conn, store_id, hook(store_id, stored))
        if pending and self.pending_fold is not None:
            limit, fold = self.pending_fold
            if conn.execute("SELECT COUNT(*) FROM hub_stock_pending").fetchone()[0] >= limit:
                fold(conn)
        for store_id, result in walk.items():
            acked[store_id], held[store_id], broken_at = anchor.walk(conn, store_id, acked[store_id], held[store_id])
            if broken_at is not None:
                result.chain_broken = walk_broken_detail(broken_at, acked[store_id])
                self._reject(conn, now, result_topic(items, store_id), store_id, "chain_broken", result.chain_broken)
                rejected += 1
                counts[store_id][1] += 1
        if rejected:
            # Ids only grow (the newest row is never deleted), so this keeps the newest rows.
            conn.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                         (self.rejections_kept,))
        revs: dict[str, int] = {}
        for store_id, seq in acked.items():
            unanchored, breaks = counts.get(store_id, (0, 0))
            rev = revs[store_id] = self._rev.get(store_id, 0) + (seq != self._acked.get(store_id, 0))
            conn.execute("INSERT INTO stores(store_id, acked_seq, updated_at, unanchored, chain_breaks, incarnation,"
                         " ack_rev) VALUES (?,?,?,?,?,?,?) ON CONFLICT(store_id) DO UPDATE SET"
                         " acked_seq = excluded.acked_seq, updated_at = excluded.updated_at,"
                         " unanchored = unanchored + excluded.unanchored,"
                         " chain_breaks = chain_breaks + excluded.chain_breaks,"
                         " incarnation = excluded.incarnation, ack_rev = excluded.ack_rev",
                         (store_id, seq, now, unanchored, breaks, incs.get(store_id), rev))
        return results, acked, max_held, held, revs, incs

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

    # ----------------------------------------------------------------- reads

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the read-only connection's own thread (never the writer's)."""
        if self._reader is None:
            reader = _Writer()
            reader.conn = await reader.call(open_readonly, self.path, f"no hub database at {self.path}")
            self._reader = reader
        try:
            return await self._reader.call(fn, self._reader.conn)
        except sqlite3.Error as exc:
            raise storage_error("read hub database", exc) from exc

    async def events_after(self, store_id: str, after_seq: int, limit: int
                           ) -> list[tuple[int, bytes, bytes | None]]:
        """Up to `limit` (seq, raw body, the hub's chain hash or None) after `after_seq`, in seq order."""
        return await self._read(lambda conn: [(seq, bytes(body), bytes(h) if h is not None else None)
                                              for seq, body, h in conn.execute(
            "SELECT seq, body, hash FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (store_id, after_seq, limit))])

    def iter_bodies(self, store_id: str, after_seq: int = 0, chunk: int = 5000) -> AsyncIterator[bytes]:
        return iter_bodies(self, store_id, after_seq, chunk)

    async def stats(self) -> dict:
        from sync.hub.reader import stats_of

        return await self._read(stats_of)

    async def store_rows(self) -> list[dict]:
        def rows(conn: sqlite3.Connection) -> list[dict]:
            held = {s: (n, m) for s, n, m in conn.execute(
                "SELECT store_id, COUNT(*), MAX(seq) FROM events GROUP BY store_id")}
            conflicts = dict(conn.execute("SELECT store_id, COUNT(*) FROM conflicts GROUP BY store_id"))
            out = []
            for store_id, acked, rev, inc, updated in conn.execute(
                    "SELECT store_id, acked_seq, ack_rev, incarnation, updated_at FROM stores ORDER BY store_id"):
                out.append({"store_id": store_id, "acked_seq": acked, "max_seq": held.get(store_id, (0, 0))[1],
                            "events": held.get(store_id, (0, 0))[0], "rev": rev, "incarnation": inc,
                            "updated_at": updated, "conflicts": conflicts.get(store_id, 0)})
            return out

        return await self._read(rows)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self._db.close()


HubStore = SqliteStorage  # the name it had before there were two engines


def apply_hook_output(conn: sqlite3.Connection, store_id: str, out) -> int:
    """Write an ingest hook's answer (sync/hub/storage.py); return the pending rows inserted."""
    if out is None:
        return 0
    if isinstance(out, (bytes, bytearray)):
        conn.execute("INSERT INTO hub_stock_pending(store_id, deltas) VALUES (?, ?)", (store_id, out))
        return 1
    for upsert in out:
        if upsert.rows:
            conn.executemany(upsert.sql("?"), upsert.rows)
    return 0


# Kept importable from here: the hub's jobs and CLI import it with the store.
from sync.hub.reader import HubReader  # noqa: E402,F401
