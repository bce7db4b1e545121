"""The agent's durable copy of the hub's latest availability snapshot and product catalog.

The snapshot lives in its own SQLite file beside the log (`events.snapshots.db`), whose
only writer is this store (one apply at a time, in a thread or in a worker process), so
a 100,000-row apply never queues behind, or holds up, the log's single writer and never
holds this process's GIL. The catalog is small and lives in the log's database, written
through `SqliteEventLog.write`. Kiosk reads go through read-only connections on the
event loop: a point read is a few microseconds, and WAL lets it see the last committed
snapshot while a new one is being written, so readers keep seeing the previous snapshot
until the new one commits, never a mix. The snapshot is derived data: losing the file
loses nothing the hub's retained message cannot bring back.

Applying is idempotent by version: a snapshot whose version is not newer than the one
held is ignored (`apply` returns False), checked inside the write transaction. An apply
writes only the rows that changed (an upsert that skips equal rows, then a delete of the
SKUs the new snapshot no longer lists), so a republished, mostly unchanged snapshot costs
lookups, not page writes; one whose items digest equals the held one writes only meta.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import hashlib
import multiprocessing
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import msgspec

from common import clock
from common.errors import StorageError, storage_error
from agent.proc import die_with_parent, lower_priority
from agent.reader import open_readonly

SNAPSHOT_SQL = """
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
    item   BLOB NOT NULL,      -- the item's JSON as received: {"sku", "nearby": [...], "online"}
    online INTEGER
) WITHOUT ROWID;
"""

CATALOG_SQL = """
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

# A row as stored: (sku, the item's JSON bytes, online or None).
Row = tuple[str, bytes, "int | None"]

_encoder = msgspec.json.Encoder()
class _StoredItem(msgspec.Struct):
    nearby: list[dict]


_item_decoder = msgspec.json.Decoder(_StoredItem)


class NearbyStock(msgspec.Struct, frozen=True, gc=False):
    """Another store of the region and its available quantity of one SKU."""

    store_id: str
    available: int


class SnapshotItem(msgspec.Struct, frozen=True, gc=False):
    """One SKU of a snapshot: the region's other stores and the online quantity (None: unknown)."""

    sku: str
    nearby: list[NearbyStock]
    online: int | None = None


def rows_of(items: Iterable[SnapshotItem]) -> list[Row]:
    """Return the stored rows for `items` (each item encoded as compact JSON)."""
    return [(item.sku, _encoder.encode(item), item.online) for item in items]


def digest_of(rows: Sequence[Row]) -> bytes:
    """Return a digest of a snapshot's rows, order included (equal digests: same content)."""
    h = hashlib.sha256()
    update_digest(h, rows)
    return h.digest()


def update_digest(h, rows: Iterable[Row]) -> None:
    """Feed rows into a running sha256 (so a caller can digest a snapshot chunk by chunk)."""
    rows = list(rows)
    if rows:  # each item's JSON is unique to its content, so the JSON alone is digested
        h.update(b"\n".join(row[1] for row in rows) + b"\n")


@dataclass(frozen=True)
class ApplyOutcome:
    """What an apply did: `applied` False when the version was not newer than the held one."""

    applied: bool
    held_version: int | None
    changed: int = 0
    removed: int = 0


class SnapshotStore:
    """The latest availability snapshot, durable in its own SQLite file beside the log.

    Create with `await SnapshotStore.open(log, max_age_s=...)`. `lookup` and `meta` are
    synchronous point reads for the kiosk path: they never wait on the network or on a
    snapshot being applied. Writes are serialized by this store: `apply`/`apply_rows` in a
    thread, `apply_in_worker` in a worker process (so decoding 100,000 items never holds
    this process's GIL); each is one transaction, committed before the call returns.
    """

    def __init__(self, log, path: Path, conn: sqlite3.Connection, max_age_s: float,
                 now: Callable[[], float]):
        self._log = log
        self.path = path
        self._conn = conn
        self.max_age_s = max_age_s
        self._now = now
        self._meta: dict | None = None
        self._lock = asyncio.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lowered: set[int] = set()
        # `await run_elsewhere(fn, *args)` runs fn in another process (see apply_in_worker).
        self.run_elsewhere: Callable[..., Awaitable[Any]] | None = None
        self.catalog = CatalogStore(log, open_readonly(log.path))

    @classmethod
    async def open(cls, log, *, path: str | Path | None = None, max_age_s: float = 120.0,
                   now: Callable[[], float] = time.time) -> "SnapshotStore":
        """Create the snapshot file (default `<log>.snapshots.db`) and the catalog tables; load both."""
        path = Path(path) if path else snapshot_path(log.path)
        try:
            await asyncio.to_thread(lambda: open_writer(path).close())
        except sqlite3.Error as exc:
            raise storage_error(f"open snapshots {path}", exc) from exc
        await log.write(create_catalog_tables)
        self = cls(log, path, open_readonly(path), max_age_s, now)
        self._meta = self._read_meta()
        await self.catalog.load()
        return self

    def close(self) -> None:
        """Stop the apply worker (waiting for it to exit: it must not outlive the agent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._conn.close()
        self.catalog.close()

    # ------------------------------------------------------------------- reads

    @property
    def version(self) -> int | None:
        """The held snapshot's version, or None before the first snapshot."""
        return self._meta["version"] if self._meta else None

    def lookup(self, sku: str) -> tuple[list[dict], int | None]:
        """Return (nearby, online) for a SKU from the held snapshot; ([], None) when it has none."""
        try:
            row = self._conn.execute(
                "SELECT item, online FROM availability_items WHERE sku = ?", (sku,)).fetchone()
        except sqlite3.Error as exc:
            raise storage_error("availability lookup", exc) from exc
        if row is None:
            return [], None
        return _item_decoder.decode(row[0]).nearby, row[1]

    def answer(self, sku: str) -> tuple[list[dict], int | None, dict | None]:
        """Return (nearby, online, meta) for a SKU, all from the same committed snapshot.

        One read transaction: an apply committing in between cannot pair the new items
        with the previous snapshot's version (as separate `lookup` and `meta` calls can).
        """
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                row = conn.execute("SELECT item, online FROM availability_items WHERE sku = ?", (sku,)).fetchone()
                head = conn.execute("SELECT version, generated_at FROM availability_snapshot WHERE id = 1").fetchone()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise storage_error("availability lookup", exc) from exc
        nearby, online = (_item_decoder.decode(row[0]).nearby, row[1]) if row else ([], None)
        return nearby, online, self._describe(*head) if head else None

    def meta(self) -> dict | None:
        """Return {version, generated_at, age_s, stale} of the held snapshot, or None.

        `age_s` is measured from the hub's `generated_at` to this agent's clock (never
        negative); `stale` is true when it exceeds `max_age_s`.
        """
        held = self._meta
        return self._describe(held["version"], held["generated_at"]) if held else None

    def _describe(self, version: int, generated_at: str) -> dict:
        try:
            age = max(0.0, self._now() - clock.parse_rfc3339(generated_at))
        except ValueError:
            age = float("inf")
        return {"version": version, "generated_at": generated_at,
                "age_s": round(age, 3) if age != float("inf") else None,
                "stale": age > self.max_age_s}

    def _read_meta(self) -> dict | None:
        row = self._conn.execute(
            "SELECT version, generated_at, applied_at, digest, items FROM availability_snapshot"
            " WHERE id = 1").fetchone()
        if row is None:
            return None
        return dict(zip(("version", "generated_at", "applied_at", "digest", "items"), row))

    # ------------------------------------------------------------------ writes

    async def apply(self, version: int, generated_at: str, items: Sequence[SnapshotItem]) -> ApplyOutcome:
        """Store a snapshot durably in one transaction if `version` is newer than the held one.

        Returns the outcome (`applied` False, nothing written, for a version not newer).
        Raises StorageError when SQLite cannot commit; then the previous snapshot stays.
        """
        rows = rows_of(items)
        return await self.apply_rows(version, generated_at, rows, digest_of(rows))

    async def apply_rows(self, version: int, generated_at: str, rows: Sequence[Row],
                         digest: bytes) -> ApplyOutcome:
        """`apply` for rows already encoded by `rows_of`."""
        async with self._lock:
            held = self._meta
            if held is not None and version <= held["version"]:
                return ApplyOutcome(False, held["version"])
            applied_at = clock.rfc3339(self._now())
            outcome = await asyncio.to_thread(write_rows, self.path, version, generated_at, applied_at,
                                              rows, digest)
            self._meta = self._read_meta()
            return outcome

    def _lower_priority(self) -> None:
        """Move a newly started apply worker to background priority (agent.proc.lower_priority).

        Its start (a fresh interpreter importing the stack, ~0.35 s of CPU) and each apply
        then take only CPU the API's event loop leaves: kiosk reads keep their latency
        while a snapshot arrives, typically right after a reconnect.
        """
        for pid in _pool_pids(self._pool):
            if pid not in self._lowered:
                self._lowered.add(pid)
                lower_priority(pid)

    async def apply_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(path, applied_at, *args)` in this store's worker process; return its result.

        `fn` (a module-level function) writes the snapshot file with `write_rows`; the held
        meta is reloaded after it returns. A dead worker is replaced on the next call.
        Raises what `fn` raises (StorageError for SQLite failures).

        With `run_elsewhere` set (`edge-agent run`: the sync worker's `call`, which already
        runs at background priority with an interpreter of its own), `fn` runs there and no
        apply process is started.
        """
        async with self._lock:
            if self.run_elsewhere is not None:
                applied_at = clock.rfc3339(self._now())
                try:
                    return await self.run_elsewhere(fn, str(self.path), applied_at, *args)
                finally:
                    self._meta = self._read_meta()
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=die_with_parent, initargs=(os.getpid(),))
            applied_at = clock.rfc3339(self._now())
            try:
                future = self._pool.submit(fn, str(self.path), applied_at, *args)
                self._lower_priority()
                return await asyncio.wrap_future(future)
            except concurrent.futures.process.BrokenProcessPool as exc:
                self._pool = None
                raise StorageError(f"snapshots: the apply worker died: {exc}") from exc
            finally:
                self._meta = self._read_meta()


def _pool_pids(pool: concurrent.futures.ProcessPoolExecutor) -> list[int]:
    return list(getattr(pool, "_processes", None) or {})


def snapshot_path(log_path: str | Path) -> Path:
    """Where a log's snapshot file lives: `events.db` -> `events.snapshots.db`."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem + ".snapshots.db")


def open_writer(path: str | Path) -> sqlite3.Connection:
    """Open the snapshot file for writing (WAL, synchronous=FULL), creating its tables."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for statement in SNAPSHOT_SQL.split(";"):
            if statement.strip():
                conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def write_rows(path: str | Path, version: int, generated_at: str, applied_at: str, rows: Sequence[Row],
               digest: bytes) -> ApplyOutcome:
    """Apply a snapshot to the file at `path` in one transaction (any thread or process).

    Raises StorageError when SQLite cannot commit (nothing changed).
    """
    try:
        conn = open_writer(path)
    except sqlite3.Error as exc:
        raise storage_error("open snapshots", exc) from exc
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcome = _apply_in_txn(conn, version, generated_at, applied_at, rows, digest)
        conn.execute("COMMIT")
        return outcome
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise storage_error("apply snapshot", exc) from exc
    finally:
        conn.close()


def _apply_in_txn(conn: sqlite3.Connection, version: int, generated_at: str, applied_at: str,
                  rows: Sequence[Row], digest: bytes) -> ApplyOutcome:
    """Runs on the writer thread inside the writer's transaction."""
    held = conn.execute("SELECT version, digest FROM availability_snapshot WHERE id = 1").fetchone()
    if held is not None and version <= held[0]:
        return ApplyOutcome(False, held[0])
    changed = removed = 0
    if held is None or held[1] != digest:
        before = conn.total_changes
        conn.executemany(
            "INSERT INTO availability_items(sku, item, online) VALUES (?, ?, ?)"
            " ON CONFLICT(sku) DO UPDATE SET item = excluded.item, online = excluded.online"
            " WHERE item IS NOT excluded.item", rows)
        changed = conn.total_changes - before
        # Every new SKU is in the table now; as many rows as SKUs means none is left over.
        if conn.execute("SELECT COUNT(*) FROM availability_items").fetchone()[0] == len(rows):
            return _set_meta(conn, version, generated_at, applied_at, digest, len(rows), held, changed, 0)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS snapshot_skus (sku TEXT PRIMARY KEY) WITHOUT ROWID")
        conn.execute("DELETE FROM temp.snapshot_skus")
        conn.executemany("INSERT OR IGNORE INTO temp.snapshot_skus(sku) VALUES (?)", ((r[0],) for r in rows))
        removed = conn.execute(
            "DELETE FROM availability_items WHERE sku NOT IN (SELECT sku FROM temp.snapshot_skus)").rowcount
        conn.execute("DELETE FROM temp.snapshot_skus")
    return _set_meta(conn, version, generated_at, applied_at, digest, len(rows), held, changed, removed)


def _set_meta(conn: sqlite3.Connection, version: int, generated_at: str, applied_at: str, digest: bytes,
              count: int, held, changed: int, removed: int) -> ApplyOutcome:
    conn.execute(
        "INSERT INTO availability_snapshot(id, version, generated_at, applied_at, digest, items)"
        " VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET version = excluded.version,"
        " generated_at = excluded.generated_at, applied_at = excluded.applied_at,"
        " digest = excluded.digest, items = excluded.items",
        (version, generated_at, applied_at, digest, count))
    return ApplyOutcome(True, held[0] if held else None, changed, removed)


class CatalogStore:
    """Product names from the hub's catalog (`P/catalog`), for kiosks.

    Kiosk code reads `name(sku)` and `search(text, limit)`; `apply(version, items)`
    replaces the catalog when `version` is newer than the held one (one transaction).
    """

    def __init__(self, log, conn: sqlite3.Connection):
        self._log = log
        self._conn = conn
        self.version: int | None = None

    def close(self) -> None:
        self._conn.close()

    async def load(self) -> None:
        row = self._conn.execute("SELECT version FROM catalog_meta WHERE id = 1").fetchone()
        self.version = row[0] if row else None

    def name(self, sku: str) -> str | None:
        """Return the product name of a SKU, or None when the catalog does not list it."""
        row = self._conn.execute("SELECT name FROM catalog_items WHERE sku = ?", (sku,)).fetchone()
        return row[0] if row else None

    def search(self, text: str, limit: int = 20) -> list[dict]:
        """Return up to `limit` {sku, name} whose name or SKU contains `text` (case-insensitive).

        SKUs that start with `text` come first, then name matches, each in SKU order.
        """
        text = text.strip()
        if not text:
            return []
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._conn.execute(
            "SELECT sku, name FROM catalog_items WHERE name LIKE ?1 ESCAPE '\\' OR sku LIKE ?1 ESCAPE '\\'"
            " ORDER BY (sku LIKE ?2 ESCAPE '\\') DESC, sku LIMIT ?3",
            (pattern, pattern[1:], max(0, limit))).fetchall()
        return [{"sku": sku, "name": name} for sku, name in rows]

    async def apply(self, version: int, items: Sequence[tuple[str, str]]) -> bool:
        """Replace the catalog with `items` ((sku, name) pairs) if `version` is newer; return whether it did."""
        if self.version is not None and version <= self.version:
            return False
        rows = list(items)

        def run(conn: sqlite3.Connection) -> bool:
            held = conn.execute("SELECT version FROM catalog_meta WHERE id = 1").fetchone()
            if held is not None and version <= held[0]:
                return False
            conn.execute("DELETE FROM catalog_items")
            conn.executemany("INSERT OR REPLACE INTO catalog_items(sku, name) VALUES (?, ?)", rows)
            conn.execute("INSERT INTO catalog_meta(id, version, items) VALUES (1, ?, ?)"
                         " ON CONFLICT(id) DO UPDATE SET version = excluded.version, items = excluded.items",
                         (version, len(rows)))
            return True

        done = await self._log.write(run)
        if done:
            self.version = version
        return done


def create_catalog_tables(conn: sqlite3.Connection) -> None:
    """Create the catalog tables (in the log's database) inside the caller's transaction."""
    for statement in CATALOG_SQL.split(";"):
        if statement.strip():
            conn.execute(statement)
