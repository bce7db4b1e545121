"""The sync process's own database (sync.db): cursor, status, snapshot and catalog.

`SqliteSyncState` is the only writer of sync.db, as the agent's log is the only writer of
events.db; the agent reads this file read-only (agent/syncview.py) for GET /v1/sync, the
availability merge and the catalog search. One connection writes, on a thread of its
own (asyncio.to_thread, one write at a time under a lock), in WAL mode with
synchronous=FULL: a write has reached the disk when its call returns, so the cursor and
a snapshot are acknowledged to the broker only after they are durable. Checkpoints run
from this connection only (SQLite 3.40's WAL-reset bug).

The tables are the interface between the two processes; `SCHEMA_VERSION` names their
shape and agent/syncview.py checks it. The snapshot is derived data: losing the file
loses nothing the hub's retained messages cannot bring back, and the cursor falls back
to 0, which only means a resend the hub deduplicates.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec

from common import clock
from common.errors import StorageError, storage_error
from common.sqlite import in_write_transaction
from sync.ports import ApplyOutcome, Row, UplinkStatus

# "4": the cursor row keeps the hub's mark of the ack it came from (`ack_epoch`, `ack_rev`,
# NULL for an older hub's ack), so crossed acks from two hub workers are told apart across
# restarts. "3": the snapshot's sources table is stored once (availability_sources) and an item's
# `sources` is its source_id -> available mapping. "2": availability_items has `cap` (the
# item's validated cap, for the agent's decide-time read) and items' `sources`/`cap` were
# validated by the downlink. Older files are migrated at open (see _migrate);
# agent/syncview.py still reads "1" (as holding no caps), "2" and "3".
SCHEMA_VERSION = "4"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    acked_seq   INTEGER NOT NULL,
    last_ack_at TEXT,
    ack_epoch   TEXT,      -- the ack's hub epoch and per-store rev (NULL: an older hub)
    ack_rev     INTEGER
);
CREATE TABLE IF NOT EXISTS status (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    pid              INTEGER NOT NULL,
    started_at       TEXT NOT NULL,
    beat_at          REAL NOT NULL,          -- Unix time of the last heartbeat
    connected        INTEGER NOT NULL,
    reconnects       INTEGER NOT NULL,
    sent_seq         INTEGER NOT NULL,
    inflight_batches INTEGER NOT NULL,
    resends          INTEGER NOT NULL,
    rewinds          INTEGER NOT NULL,
    ack_alarms       INTEGER NOT NULL,
    alarm            TEXT,
    events_sent      INTEGER NOT NULL,
    counters         TEXT NOT NULL           -- JSON object: the downlink's counts
);
-- Why the MQTT link cannot work as configured (sync/tls.py's LinkAlarm), while it holds:
-- no row when there is none. A table of its own, so sync.db files from before it still open.
CREATE TABLE IF NOT EXISTS link_alarm (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    code    TEXT NOT NULL,
    message TEXT NOT NULL,
    since   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS availability_snapshot (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    version      INTEGER NOT NULL,
    generated_at TEXT NOT NULL,
    applied_at   TEXT NOT NULL,
    digest       BLOB NOT NULL,
    items        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS availability_items (
    sku    TEXT PRIMARY KEY,
    item   BLOB NOT NULL,      -- the item's JSON as received: {"sku", "nearby": [...], "online", "sources"?, "cap"?}
    online INTEGER,
    cap    BLOB                -- the item's cap as JSON, NULL when none applies
) WITHOUT ROWID;
-- The held snapshot's sources table: each source's metadata once; the items' `sources`
-- map source_id -> available. Replaced with the snapshot, in the same transaction.
CREATE TABLE IF NOT EXISTS availability_sources (
    position      INTEGER PRIMARY KEY,   -- the hub's order (its config order)
    source_id     TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    lead_time_s   INTEGER NOT NULL,
    updated_at    TEXT NOT NULL,
    stale         INTEGER NOT NULL,      -- the hub's judgment when it generated the snapshot
    stale_after_s INTEGER NOT NULL
);
-- Rehydrate (sync/rehydrate.py, agent/rehydrate.py): the hub's ack for this store as last
-- heard, whatever the log holds, with the log's incarnation it was heard under; and the
-- hub's events staged for the agent, which appends them to the log and so fences writes
-- until it holds them. Rows at or below the log's end are pruned.
CREATE TABLE IF NOT EXISTS hub_ack (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    acked_seq   INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    heard_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq  INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    hash BLOB                -- the hub's chain hash at seq; NULL: the hub sent none
);
CREATE TABLE IF NOT EXISTS catalog_meta (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    items   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS catalog_items (
    sku  TEXT PRIMARY KEY,
    name TEXT NOT NULL
) WITHOUT ROWID;
"""

_STATUS_UPSERT = (
    "INSERT INTO status(id, pid, started_at, beat_at, connected, reconnects, sent_seq, inflight_batches,"
    " resends, rewinds, ack_alarms, alarm, events_sent, counters) VALUES (1,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at,"
    " beat_at = excluded.beat_at, connected = excluded.connected, reconnects = excluded.reconnects,"
    " sent_seq = excluded.sent_seq, inflight_batches = excluded.inflight_batches,"
    " resends = excluded.resends, rewinds = excluded.rewinds, ack_alarms = excluded.ack_alarms,"
    " alarm = excluded.alarm, events_sent = excluded.events_sent, counters = excluded.counters")


class SqliteSyncState:
    """sync.db's only writer; see the module docstring. Open with `await SqliteSyncState.open(...)`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, now: Callable[[], float]):
        self.path = path
        self._conn = conn
        self._now = now
        self._lock = asyncio.Lock()
        self._pid = os.getpid()
        self._started_at = clock.rfc3339(now())
        self._status = UplinkStatus()
        self._counters: dict[str, int] = {}
        self._snapshot_version: int | None = None
        self._catalog_version: int | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike, store_id: str, *,
                   now: Callable[[], float] = time.time) -> "SqliteSyncState":
        """Open (creating if needed) sync.db for `store_id`; raises StorageError naming the cause.

        A file that belongs to another store is refused: its cursor would be another store's.
        """
        path = Path(path)
        try:
            conn = await asyncio.to_thread(_open, path, store_id)
        except sqlite3.Error as exc:
            raise storage_error(f"open {path}", exc) from exc
        self = cls(path, conn, now=now)
        self._snapshot_version, self._catalog_version, self._counters = await self._run(_held)
        # A new process knows of no alarm yet (the last one's config may have been fixed);
        # its MQTT client raises any that still holds at start.
        await self.store_link_alarm(None)
        await self.beat()
        return self

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._conn.close)

    async def _run(self, fn: Callable[..., Any], *args: Any, transaction: bool = False) -> Any:
        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(in_write_transaction, self._conn, fn, *args)
                                         if transaction else asyncio.to_thread(fn, self._conn, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A cancelled caller does not stop the thread, which still uses the connection:
                # hold the lock until it is done, so close() never closes it under a statement.
                await asyncio.wait([work])
                raise
            except sqlite3.Error as exc:
                raise storage_error(f"sync state {getattr(fn, '__name__', 'write')}", exc) from exc

    # ----------------------------------------------------------- cursor, status

    async def cursor(self) -> tuple[int, str | None]:
        row = await self._run(lambda conn: conn.execute(
            "SELECT acked_seq, last_ack_at FROM cursor WHERE id = 1").fetchone())
        return (row[0], row[1]) if row else (0, None)

    async def ack_mark(self) -> tuple[str | None, int | None]:
        row = await self._run(lambda conn: conn.execute(
            "SELECT ack_epoch, ack_rev FROM cursor WHERE id = 1").fetchone())
        return (row[0], row[1]) if row else (None, None)

    async def store_cursor(self, acked_seq: int, at: str, status: UplinkStatus | None = None,
                           mark: tuple[str | None, int | None] = (None, None)) -> None:
        if status is not None:
            self._status = status
        values = self._status_row()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO cursor(id, acked_seq, last_ack_at, ack_epoch, ack_rev) VALUES (1, ?, ?, ?, ?)"
                         " ON CONFLICT(id) DO UPDATE SET acked_seq = excluded.acked_seq,"
                         " last_ack_at = excluded.last_ack_at, ack_epoch = excluded.ack_epoch,"
                         " ack_rev = excluded.ack_rev", (acked_seq, at, *mark))
            conn.execute(_STATUS_UPSERT, values)

        await self._run(write, transaction=True)

    async def store_status(self, status: UplinkStatus) -> None:
        self._status = status
        await self.beat()

    async def beat(self) -> None:
        values = self._status_row()
        await self._run(lambda conn: conn.execute(_STATUS_UPSERT, values), transaction=True)

    async def store_link_alarm(self, alarm: dict | None) -> None:
        """Record the link's alarm ({code, message, since}), or clear it (None); idempotent."""
        def write(conn: sqlite3.Connection) -> None:
            if alarm is None:
                conn.execute("DELETE FROM link_alarm")
            else:
                conn.execute("INSERT INTO link_alarm(id, code, message, since) VALUES (1, ?, ?, ?)"
                             " ON CONFLICT(id) DO UPDATE SET code = excluded.code,"
                             " message = excluded.message, since = excluded.since",
                             (alarm["code"], alarm["message"], alarm["since"]))

        await self._run(write, transaction=True)

    async def add_counts(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            self._counters[key] = self._counters.get(key, 0) + n
        await self.beat()

    def _status_row(self) -> tuple:
        s = self._status
        return (self._pid, self._started_at, self._now(), int(s.connected), s.reconnects, s.sent_seq,
                s.inflight_batches, s.resends, s.rewinds, s.ack_alarms, s.alarm, s.events_sent,
                msgspec.json.encode(self._counters).decode())

    # ------------------------------------------------------------- snapshot

    @property
    def snapshot_version(self) -> int | None:
        return self._snapshot_version

    async def apply_snapshot(self, version: int, generated_at: str, rows: Sequence[Row],
                             digest: bytes, sources: Sequence[tuple] = ()) -> ApplyOutcome:
        """Store a newer snapshot: its items (`rows`) and its sources table (`sources`,
        downlink.table_rows), in one transaction."""
        applied_at = clock.rfc3339(self._now())
        outcome = await self._run(_apply_snapshot, version, generated_at, applied_at, rows, digest,
                                  list(sources), transaction=True)
        if outcome.applied:
            self._snapshot_version = version
        return outcome

    # -------------------------------------------------------------- catalog

    @property
    def catalog_version(self) -> int | None:
        return self._catalog_version

    async def apply_catalog(self, version: int, items: Sequence[tuple[str, str]]) -> bool:
        if self._catalog_version is not None and version <= self._catalog_version:
            return False
        done = await self._run(_apply_catalog, version, list(items), transaction=True)
        if done:
            self._catalog_version = version
        return done

    # ------------------------------------------------------------ rehydrate

    async def store_hub_ack(self, acked_seq: int, incarnation: int, at: str) -> None:
        """Record the hub's ack as heard (sync/rehydrate.py), durably."""
        await self._run(lambda conn: conn.execute(
            "INSERT INTO hub_ack(id, acked_seq, incarnation, heard_at) VALUES (1, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET acked_seq = excluded.acked_seq,"
            " incarnation = excluded.incarnation, heard_at = excluded.heard_at",
            (acked_seq, incarnation, at)), transaction=True)

    async def hub_ack(self) -> tuple[int, int] | None:
        row = await self._run(lambda conn: conn.execute(
            "SELECT acked_seq, incarnation FROM hub_ack WHERE id = 1").fetchone())
        return (row[0], row[1]) if row else None

    async def stage_history(self, rows: list[tuple[int, bytes, bytes | None]], upto: int) -> int:
        """Stage the hub's events for the agent; drop staged rows at or below `upto` (the log's end).

        Returns the highest seq staged after `upto` that continues it gapless (`upto` when none).
        """
        def write(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM history WHERE seq <= ?", (upto,))
            # The hub's newest answer wins over rows staged before (a refused history stays
            # staged until the hub sends another).
            conn.executemany("INSERT OR REPLACE INTO history(seq, body, hash) VALUES (?, ?, ?)",
                             [(seq, bytearray(body), h) for seq, body, h in rows if seq > upto])
            return _staged_end(conn, upto)

        return await self._run(write, transaction=True)

    async def drop_history(self) -> None:
        await self._run(lambda conn: conn.execute("DELETE FROM history"), transaction=True)

    # ---------------------------------------------------------- maintenance

    async def wal_checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Checkpoint sync.db's WAL from its writer; return SQLite's (busy, log, checkpointed)."""
        if mode not in ("PASSIVE", "TRUNCATE"):
            raise ValueError(f"wal_checkpoint: unknown mode {mode!r}")
        return await self._run(lambda conn: tuple(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()))


# --------------------------------------------------------------- SQL, on the thread


def _open(path: Path, store_id: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StorageError(f"storage: {path} cannot use WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA_SQL)
        owner = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if owner is None:
            conn.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?), ('schema', ?)",
                         (store_id, SCHEMA_VERSION))
        elif owner[0] != store_id:
            raise StorageError(f"storage: {path} belongs to store {owner[0]!r}, not {store_id!r}")
        else:
            in_write_transaction(conn, _migrate, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _staged_end(conn: sqlite3.Connection, upto: int) -> int:
    """The end of the gapless run of staged history rows after `upto`."""
    end = upto
    for (seq,) in conn.execute("SELECT seq FROM history WHERE seq > ? ORDER BY seq", (upto,)):
        if seq != end + 1:
            break
        end = seq
    return end


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a sync.db of schema "1", "2" or "3" to "4"; refuse one newer than this process knows.

    "4" adds the cursor's `ack_epoch`/`ack_rev` (NULL: the stored cursor keeps today's
    rules until the next ack brings a mark).

    "1" stored items without looking at `sources` or `cap`, and "2" items carry each
    source's metadata in a `sources` list: a held snapshot whose items carry either (for
    "1") or `sources` (for "2") is dropped, and the hub's retained snapshot brings it
    back, validated, in the current shape. A snapshot without them is kept ("1" gains
    the empty `cap` column; the sources table, created empty, is its table).
    """
    held = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    version = held[0] if held else "1"
    if version == SCHEMA_VERSION:
        return
    if version not in ("1", "2", "3"):
        raise StorageError(f"storage: {path} has sync schema {version}; this sync process knows {SCHEMA_VERSION}")
    cursor_columns = {row[1] for row in conn.execute("PRAGMA table_info(cursor)")}
    for column, kind in (("ack_epoch", "TEXT"), ("ack_rev", "INTEGER")):
        if column not in cursor_columns:
            conn.execute(f"ALTER TABLE cursor ADD COLUMN {column} {kind}")
    if version == "3":
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        return
    columns = {row[1] for row in conn.execute("PRAGMA table_info(availability_items)")}
    if "cap" not in columns:
        conn.execute("ALTER TABLE availability_items ADD COLUMN cap BLOB")
    unchecked = " OR instr(CAST(item AS TEXT), '\"cap\"')" if version == "1" else ""
    stale_shape = conn.execute(
        "SELECT 1 FROM availability_items WHERE instr(CAST(item AS TEXT), '\"sources\"')" + unchecked
        + " LIMIT 1").fetchone()
    if stale_shape:
        conn.execute("DELETE FROM availability_items")
        conn.execute("DELETE FROM availability_snapshot")
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)"
                 " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (SCHEMA_VERSION,))


def _held(conn: sqlite3.Connection) -> tuple[int | None, int | None, dict[str, int]]:
    snap = conn.execute("SELECT version FROM availability_snapshot WHERE id = 1").fetchone()
    cat = conn.execute("SELECT version FROM catalog_meta WHERE id = 1").fetchone()
    counters = conn.execute("SELECT counters FROM status WHERE id = 1").fetchone()
    return (snap[0] if snap else None, cat[0] if cat else None,
            msgspec.json.decode(counters[0]) if counters else {})


def _apply_snapshot(conn: sqlite3.Connection, version: int, generated_at: str, applied_at: str,
                    rows: Sequence[Row], digest: bytes, sources: list[tuple]) -> ApplyOutcome:
    """Write only what changed: the rows that differ from the held ones, then the SKUs no longer listed.

    The sources table (a few rows) is replaced whole.
    """
    held = conn.execute("SELECT version, digest FROM availability_snapshot WHERE id = 1").fetchone()
    if held is not None and version <= held[0]:
        return ApplyOutcome(False, held[0])
    conn.execute("DELETE FROM availability_sources")
    conn.executemany("INSERT INTO availability_sources(position, source_id, name, kind, lead_time_s,"
                     " updated_at, stale, stale_after_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sources)
    changed = removed = 0
    if held is None or held[1] != digest:
        # Compare with the held items and write only the rows that differ: at 100,000 SKUs
        # reading them back costs about a third of an upsert that skips equal rows.
        stored = dict(conn.execute("SELECT sku, item FROM availability_items"))
        fresh = [row if len(row) == 4 else (*row, None) for row in rows
                 if stored.pop(row[0], None) != memoryview(row[1])]
        conn.executemany(
            "INSERT INTO availability_items(sku, item, online, cap) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(sku) DO UPDATE SET item = excluded.item, online = excluded.online, cap = excluded.cap",
            fresh)
        changed = len(fresh)
        if stored:  # what is left is no longer listed
            conn.executemany("DELETE FROM availability_items WHERE sku = ?", ((sku,) for sku in stored))
            removed = len(stored)
    conn.execute(
        "INSERT INTO availability_snapshot(id, version, generated_at, applied_at, digest, items)"
        " VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET version = excluded.version,"
        " generated_at = excluded.generated_at, applied_at = excluded.applied_at,"
        " digest = excluded.digest, items = excluded.items",
        (version, generated_at, applied_at, digest, len(rows)))
    return ApplyOutcome(True, held[0] if held else None, changed, removed)


def _apply_catalog(conn: sqlite3.Connection, version: int, rows: list[tuple[str, str]]) -> bool:
    held = conn.execute("SELECT version FROM catalog_meta WHERE id = 1").fetchone()
    if held is not None and version <= held[0]:
        return False
    conn.execute("DELETE FROM catalog_items")
    conn.executemany("INSERT OR REPLACE INTO catalog_items(sku, name) VALUES (?, ?)", rows)
    conn.execute("INSERT INTO catalog_meta(id, version, items) VALUES (1, ?, ?)"
                 " ON CONFLICT(id) DO UPDATE SET version = excluded.version, items = excluded.items",
                 (version, len(rows)))
    return True
