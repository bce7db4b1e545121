"""SQLite helpers shared by every storage adapter (agent log, sync state, hub store)."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Any, Callable, TypeVar

from common.errors import StorageError, storage_error

T = TypeVar("T")


def open_readonly(path: str | Path, missing: str) -> sqlite3.Connection:
    """Open a database read-only (it can never write or checkpoint); raise StorageError.

    `missing` is the error's text when there is no file at `path`.
    """
    path = Path(path)
    if not path.exists():
        raise StorageError(f"storage: {missing}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
    except sqlite3.Error as exc:
        raise storage_error(f"open {path} read-only", exc) from exc
    return conn


def in_write_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any,
                         begin: str = "BEGIN IMMEDIATE") -> T:
    """Run `fn(conn, *args)` between `begin` and COMMIT; roll back and re-raise on any error.

    `conn` is a sqlite3 connection or anything with its `execute` and `in_transaction`
    (sync/hub/sqlcompat.py's PostgreSQL adapter).
    """
    conn.execute(begin)
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


INSERT_CHUNK = 256  # rows per multi-row statement, at most (12 columns: 3,072 parameters)


def insert_rows(conn: sqlite3.Connection, head: str, rows: list[tuple], tail: str = "") -> None:
    """Run `head VALUES (?,..),(?,..),... tail` over `rows`, many rows per statement.

    Same effect as `executemany(head + " VALUES (?,..)" + tail, rows)` at about half the
    cost per row: one bind and step per chunk instead of per row. Chunks are powers of two
    (256, 128, ..., 1), so the few distinct statements stay in sqlite3's statement cache.
    (For the rowid tables: into a WITHOUT ROWID table with random keys it measured slower.)
    """
    if not rows:
        return
    width, at, total = len(rows[0]), 0, len(rows)
    while at < total:
        size = min(INSERT_CHUNK, 1 << ((total - at).bit_length() - 1))
        conn.execute(_values_sql(head, tail, width, size), [value for row in rows[at:at + size] for value in row])
        at += size


@functools.lru_cache(maxsize=128)
def _values_sql(head: str, tail: str, width: int, count: int) -> str:
    one = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([one] * count)}{tail}"
