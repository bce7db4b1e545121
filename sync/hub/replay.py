"""`edge-hub replay --store ID --from SEQ`: recompute a store's projection rows from its held events.

The operator's "reset the checkpoint to before the issue": after a projection bug, a
restored table or a hand edit, the store's availability rows are recomputed from the
events the hub holds (`projection.rebuild_store`): every SKU that its events from SEQ on
touch gets its `hub_stock` row and its cap use rows rebuilt from all of the store's held
events of that SKU (the projection is a sum: a row is rebuilt whole; `--from 1`, the
default, rebuilds every row of the store). One transaction; the leader's next snapshot
run publishes what changed (its digest differs).

* PostgreSQL (`storage.url`): runs beside the running workers. The pending table is locked
  for the transaction (ingest transactions wait at their pending row, the leader's fold
  waits), so the rows match the events exactly.
* SQLite: the hub process is the database's only writer, so replay runs with the hub
  stopped: it opens hub.db in exclusive locking mode and refuses (exit 3) while any other
  process has the database open.
"""

from __future__ import annotations

import sqlite3
import zoneinfo
from pathlib import Path

from common import clock
from common.errors import StorageError, storage_error
from sync.hub import captables, projection, sqlcompat
from sync.hub import caps as capcore
from sync.hub.settings import HubConfig, zones


class ReplayError(ValueError):
    """A replay request that does not fit (names the option)."""


def day_function(cfg: HubConfig):
    by_store = zones(cfg)

    def day_of(store_id: str, recorded_at: str) -> str:
        zone = by_store.get(store_id) or zoneinfo.ZoneInfo("UTC")
        return capcore.local_day(clock.parse_rfc3339(recorded_at), zone)

    return day_of


def replay(cfg: HubConfig, store_id: str, from_seq: int = 1) -> dict:
    """Rebuild the store's rows (see the module docstring); return `rebuild_store`'s summary.

    Raises ReplayError for a bad option, StorageError when the database cannot be used.
    """
    if from_seq < 1:
        raise ReplayError(f"--from: {from_seq} is below 1")
    if store_id not in set(cfg.store_ids()):
        raise ReplayError(f"--store: {store_id!r} is not in the hub's [[stores]]")
    day_of = day_function(cfg)

    def rebuild(conn):
        return projection.rebuild_store(conn, store_id, from_seq,
                                        lambda c, s, events: captables.apply_usage(c, s, events, day_of))

    url = getattr(cfg.storage, "url", "") or ""
    if url:
        return _on_postgres(url, rebuild)
    return _on_sqlite(Path(cfg.storage.path), rebuild)


def _on_postgres(url: str, rebuild) -> dict:
    import psycopg

    try:
        conn = sqlcompat.connect(url, "edge-hub-replay")
    except psycopg.Error as exc:
        raise StorageError(f"storage: cannot connect to PostgreSQL: {exc}") from exc
    try:
        return sqlcompat.in_transaction(conn, rebuild)
    except psycopg.Error as exc:
        raise StorageError(f"storage: replay failed on PostgreSQL: {exc}") from exc
    finally:
        conn.close()


def _on_sqlite(path: Path, rebuild) -> dict:
    if not path.exists():
        raise StorageError(f"storage: no hub database at {path}")
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=2.0)
    except sqlite3.Error as exc:
        raise storage_error(f"open {path}", exc) from exc
    try:
        # Exclusive locking mode: the write transaction gets the file only when no other
        # process (a running hub) has it open, so the hub stays the one writer it assumes.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StorageError(f"storage: {path} is open in another process (a running hub?):"
                                   " stop the hub, then replay") from exc
            raise
        try:
            out = rebuild(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out
    except sqlite3.Error as exc:
        raise storage_error("replay", exc) from exc
    finally:
        conn.close()
