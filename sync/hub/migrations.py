"""The hub database's schema migrations: one versioned list per engine.

Each migration runs in its own transaction together with its `schema_migrations` row, so
a database holds a migration completely with its record or not at all; reopening runs
only what is missing (a crash mid-migration leaves it to run again).

SQLite migration 1 is the schema the hub had before this list existed (every statement
`IF NOT EXISTS`, columns added where missing), so an existing database opens unchanged
and is then migrated. PostgreSQL migrations run under a transaction-scoped advisory lock,
so workers opening the same database at once apply each migration once.

Extension point: a module listed in `MODULES` may define `SQLITE_MIGRATIONS` and/or
`POSTGRES_MIGRATIONS` (lists of `Migration`); they join the engine's list, ordered by
version. Versions are global per engine: 1-99 the hub's core storage (this file),
100-199 the availability tables (projection, feeds, caps), 200 and above anything else.
A migration's `apply` is a list of SQL statements (no parameters), or a function of the
connection: `fn(sqlite3.Connection)` for SQLite, `async fn(psycopg.AsyncConnection)` for
PostgreSQL. Never change a released migration: add one.
"""

from __future__ import annotations

import importlib
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from common import clock

# Modules whose SQLITE_MIGRATIONS / POSTGRES_MIGRATIONS join the lists below.
MODULES: tuple[str, ...] = ("sync.hub.projection", "sync.hub.feeds", "sync.hub.captables")

PG_LOCK_KEY = 0x6564676568756200  # pg_advisory_xact_lock key while migrating ("edgehub\0")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Union[Sequence[str], Callable[[Any], Any]]


# ------------------------------------------------------------------ SQLite core

_SQLITE_V1 = [
    """CREATE TABLE IF NOT EXISTS events (
        store_id    TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        event_id    TEXT NOT NULL,
        body        BLOB NOT NULL,
        received_at TEXT NOT NULL,
        hash        BLOB,
        PRIMARY KEY (store_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS stores (
        store_id     TEXT PRIMARY KEY,
        acked_seq    INTEGER NOT NULL,
        updated_at   TEXT NOT NULL,
        unanchored   INTEGER NOT NULL DEFAULT 0,
        chain_breaks INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS conflicts (
        store_id      TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        event_id      TEXT NOT NULL,
        held_event_id TEXT NOT NULL,
        body          BLOB NOT NULL,
        received_at   TEXT NOT NULL,
        PRIMARY KEY (store_id, seq, event_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rejections (
        id          INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        topic       TEXT NOT NULL,
        store_id    TEXT,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rejection_counts (
        reason TEXT PRIMARY KEY,
        count  INTEGER NOT NULL
    ) WITHOUT ROWID""",
]


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _sqlite_v1(conn: sqlite3.Connection) -> None:
    """The schema as it was before versioned migrations (a database of any earlier release)."""
    from sync.hub import anchor

    for statement in _SQLITE_V1:
        conn.execute(statement)
    anchor.migrate(conn)
    # A database from before rejection_counts: count what its rejections table holds.
    conn.execute("INSERT INTO rejection_counts(reason, count) SELECT reason, COUNT(*) FROM rejections"
                 " WHERE NOT EXISTS (SELECT 1 FROM rejection_counts) GROUP BY reason")


def _sqlite_v2(conn: sqlite3.Connection) -> None:
    """Store incarnation and ack revision (docs/protocol.md, Acks across workers)."""
    held = _columns(conn, "stores")
    if "incarnation" not in held:
        conn.execute("ALTER TABLE stores ADD COLUMN incarnation INTEGER")
    if "ack_rev" not in held:
        conn.execute("ALTER TABLE stores ADD COLUMN ack_rev INTEGER NOT NULL DEFAULT 0")


SQLITE: list[Migration] = [
    Migration(1, "events, stores, conflicts, rejections", _sqlite_v1),
    Migration(2, "stores.incarnation, stores.ack_rev", _sqlite_v2),
]

# -------------------------------------------------------------- PostgreSQL core

POSTGRES: list[Migration] = [
    Migration(1, "events, stores, conflicts, rejections, hub_meta, hub_stock_pending", [
        """CREATE TABLE events (
            store_id    TEXT NOT NULL,
            seq         BIGINT NOT NULL,
            event_id    TEXT NOT NULL,
            body        BYTEA NOT NULL,
            received_at TEXT NOT NULL,
            hash        BYTEA,
            PRIMARY KEY (store_id, seq)
        )""",
        # max_seq: the highest seq held (= acked_seq when nothing is held after a gap).
        """CREATE TABLE stores (
            store_id     TEXT PRIMARY KEY,
            acked_seq    BIGINT NOT NULL DEFAULT 0,
            max_seq      BIGINT NOT NULL DEFAULT 0,
            ack_rev      BIGINT NOT NULL DEFAULT 0,
            incarnation  BIGINT,
            updated_at   TEXT NOT NULL DEFAULT '',
            unanchored   BIGINT NOT NULL DEFAULT 0,
            chain_breaks BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE conflicts (
            store_id      TEXT NOT NULL,
            seq           BIGINT NOT NULL,
            event_id      TEXT NOT NULL,
            held_event_id TEXT NOT NULL,
            body          BYTEA NOT NULL,
            received_at   TEXT NOT NULL,
            PRIMARY KEY (store_id, seq, event_id)
        )""",
        """CREATE TABLE rejections (
            id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            received_at TEXT NOT NULL,
            topic       TEXT NOT NULL,
            store_id    TEXT,
            reason      TEXT NOT NULL,
            detail      TEXT NOT NULL
        )""",
        """CREATE TABLE rejection_counts (
            reason TEXT PRIMARY KEY,
            count  BIGINT NOT NULL
        )""",
        """CREATE TABLE hub_meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        # One row per store per ingest transaction (the projection's summed stock changes,
        # msgpack): the leader folds them into the projection (sync/hub/projection.py).
        """CREATE TABLE hub_stock_pending (
            id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            store_id TEXT NOT NULL,
            deltas   BYTEA NOT NULL
        )""",
    ]),
]


def sqlite_migrations() -> list[Migration]:
    return _collect(SQLITE, "SQLITE_MIGRATIONS")


def postgres_migrations() -> list[Migration]:
    return _collect(POSTGRES, "POSTGRES_MIGRATIONS")


def _collect(core: list[Migration], attr: str) -> list[Migration]:
    out = list(core)
    for name in MODULES:
        out.extend(getattr(importlib.import_module(name), attr, ()))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"hub migrations: a version is used twice: {sorted(versions)}")
    return sorted(out, key=lambda m: m.version)


# --------------------------------------------------------------------- runners

_RECORD_SQL = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
               " applied_at TEXT NOT NULL)")


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply every missing SQLite migration (autocommit connection); return the versions applied."""
    conn.execute(_RECORD_SQL)
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for m in sqlite_migrations():
        if m.version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if callable(m.apply):
                m.apply(conn)
            else:
                for statement in m.apply:
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (?,?,?)",
                         (m.version, m.name, clock.utc_now()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied


async def migrate_postgres(conn) -> list[int]:
    """Apply every missing PostgreSQL migration on `conn` (a psycopg AsyncConnection, autocommit
    off); return the versions applied. Each one under the advisory lock, with its record."""
    applied = []
    for m in postgres_migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))
            await conn.execute(_RECORD_SQL)
            cur = await conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (m.version,))
            if await cur.fetchone() is not None:
                continue
            if callable(m.apply):
                await m.apply(conn)
            else:
                for statement in m.apply:
                    await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (%s, %s, %s)",
                               (m.version, m.name, clock.utc_now()))
        applied.append(m.version)
    return applied
