"""A psycopg 3 (sync) connection with the sqlite3 surface the hub's availability modules use.

The availability modules (projection, feeds, captables, compute, publisher) are written
against a sqlite3 connection inside one transaction. `PgConn` gives a psycopg connection
the same few calls, so the same functions run on PostgreSQL:

* `execute(sql, params)` returns a cursor (`fetchone`, `fetchall`, iteration, `rowcount`),
  `executemany(sql, rows)`;
* `?` placeholders become `%s` (and a literal `%` is escaped), once per distinct statement;
* bytes, bytearray and memoryview bind as bytea, and bytea reads back as bytes;
* `in_transaction`, and `BEGIN` / `COMMIT` / `ROLLBACK` as statements (the connection is in
  autocommit mode, so a statement outside BEGIN commits on its own, as with sqlite3's
  `isolation_level=None`).

The modules keep their SQL portable: `INSERT ... ON CONFLICT`, upsert expressions
qualified with the table name, `CASE` for a scalar max. `is_pg(conn)` tells a function
which engine it runs on where the two differ (DDL, locks).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, TypeVar

from common.sqlite import in_write_transaction

T = TypeVar("T")

DIALECT_SQLITE = "sqlite"
DIALECT_PG = "postgresql"


def is_pg(conn: Any) -> bool:
    """Whether `conn` is a PostgreSQL connection (a PgConn) rather than a sqlite3 one."""
    return getattr(conn, "dialect", DIALECT_SQLITE) == DIALECT_PG


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """Translate a statement's `?` placeholders to psycopg's `%s` (a literal `%` doubled).

    The hub's statements hold no `?` inside string literals, so a plain replace is exact.
    """
    return sql.replace("%", "%%").replace("?", "%s")


def _binary(params: Iterable) -> list:
    # psycopg binds bytes as bytea; bytearray and memoryview too, but a msgspec.Raw or a
    # bytes subclass would not adapt: give it plain bytes.
    return [bytes(p) if isinstance(p, (bytearray, memoryview)) else p for p in params]


class PgConn:
    """A psycopg 3 sync connection (autocommit) with the sqlite3 calls the hub's SQL uses."""

    dialect = DIALECT_PG

    def __init__(self, raw):
        self.raw = raw  # psycopg.Connection, autocommit=True

    def execute(self, sql: str, params: Iterable = ()):
        cur = self.raw.cursor()
        params = list(params)
        if not params:
            # No parameters: psycopg sends the text as it is (no placeholder parsing).
            cur.execute(sql)
        else:
            cur.execute(pg_sql(sql), _binary(params))
        return cur

    def executemany(self, sql: str, rows: Iterable[Iterable]):
        cur = self.raw.cursor()
        rows = [_binary(r) for r in rows]
        if rows:
            cur.executemany(pg_sql(sql), rows)
        return cur

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


def connect(url: str, application_name: str = "edge-hub") -> PgConn:
    """Open a PgConn (autocommit) to `url`."""
    import psycopg

    return PgConn(psycopg.connect(url, autocommit=True, application_name=application_name))


def in_transaction(conn, fn: Callable[..., T], *args: Any, begin: str = "BEGIN") -> T:
    """Run `fn(conn, *args)` in one transaction on either engine; roll back and re-raise on any error.

    SQLite: BEGIN IMMEDIATE (the writer). PostgreSQL: `begin` (READ COMMITTED by default).
    """
    return in_write_transaction(conn, fn, *args, begin=begin if is_pg(conn) else "BEGIN IMMEDIATE")


def read_transaction(conn) -> str:
    """The statement opening a consistent read-only view on `conn`'s engine."""
    return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if is_pg(conn) else "BEGIN"


def xact_lock(conn, key: int) -> None:
    """On PostgreSQL, take transaction-scoped advisory lock `key` (serialises writers of one kind
    across workers; released at commit). Nothing on SQLite, whose writer is already one."""
    if is_pg(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (key,))


# ------------------------------------------------------------------ DDL


_WITHOUT_ROWID = re.compile(r"\)\s*WITHOUT ROWID\s*$", re.IGNORECASE)
_BLOB = re.compile(r"\bBLOB\b")
_ROWID_PK = re.compile(r"\bid\s+INTEGER PRIMARY KEY\b")


def pg_ddl(statement: str, bigint: Iterable[str] = ()) -> str:
    """The PostgreSQL form of one of the modules' SQLite DDL statements.

    WITHOUT ROWID dropped, BLOB -> BYTEA, an `id INTEGER PRIMARY KEY` (SQLite's rowid alias)
    -> `BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY`, and the named columns (milliseconds
    and versions, past 2^31) BIGINT.
    """
    out = _WITHOUT_ROWID.sub(")", statement.strip())
    out = _BLOB.sub("BYTEA", out)
    out = _ROWID_PK.sub("id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", out)
    for column in bigint:
        out = re.sub(rf"\b{column}(\s+)INTEGER\b", rf"{column}\1BIGINT", out)
    return out


class PgRunner:
    """`run(fn)` for the availability modules on PostgreSQL: `fn(PgConn)` in one transaction.

    The hub storage's own pool is async (psycopg AsyncConnection); these modules are
    synchronous, so they get one sync connection of their own, used on one thread (writes
    from the publisher and the feed inputs are few and sequential). The connection is
    opened on first use and again after it fails. Raises StorageError (rolled back).
    """

    def __init__(self, url: str, application_name: str = "edge-hub-availability"):
        from concurrent.futures import ThreadPoolExecutor

        self.url = url
        self.application_name = application_name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-hub-availability")
        self._conn: PgConn | None = None

    def _call(self, fn: Callable[[PgConn], T]) -> T:
        import psycopg

        from common.errors import StorageError

        try:
            if self._conn is None or self._conn.raw.closed:
                self._conn = connect(self.url, self.application_name)
            return in_transaction(self._conn, fn)
        except psycopg.Error as exc:
            if self._conn is not None and (self._conn.raw.closed or self._conn.raw.broken):
                self._conn = None
            raise StorageError(f"storage: hub write on PostgreSQL failed: {exc}") from exc

    async def run(self, fn: Callable[[PgConn], T]) -> T:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)


def runner_for(store, url: str):
    """What the availability modules' transactions run on: the SQLite store itself (its writer),
    or a PgRunner for a PostgreSQL `url`."""
    return PgRunner(url) if url else store
