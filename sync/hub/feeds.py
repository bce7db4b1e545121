"""The hub's external feed tables: source stock lists and open orders (SQL only).

Every function takes a connection inside the caller's transaction (`HubStore.run`
for writes; the snapshot computation's read transaction for reads): sqlite3, or a
`sync.hub.sqlcompat.PgConn` on PostgreSQL (the same SQL; `PG_SCHEMA` is its DDL).

With several hub workers on one PostgreSQL every worker receives every feed message and
applies it (each write is idempotent: a version that is not newer, an order state
already held, a cap already set change nothing), one worker at a time (`FEEDS_LOCK`, a
transaction advisory lock), so a message is applied while any worker runs, not only
while a leader does.

* `source_stock` / `source_feeds`: each configured source's latest list, its version and
  when the hub accepted it (`updated_at_ms`). A hub database from before sources (tables
  `warehouse_stock` / `warehouse_feeds`) is migrated once: its rows move over with an
  unknown acceptance time (NULL), which reads as stale until that source sends again.
* `orders`: one row per (source_id, order_id), the latest state accepted. Open orders
  claim their qty; fulfilled and cancelled ones are kept (so a legacy feed resending an
  old "open" cannot reopen them).
"""

from __future__ import annotations

import sqlite3
from typing import Iterable

from sync.hub import sqlcompat
from sync.hub.migrations import Migration

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS source_stock (
        source_id TEXT NOT NULL,
        sku       TEXT NOT NULL,
        available INTEGER NOT NULL,
        PRIMARY KEY (source_id, sku)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS source_feeds (
        source_id     TEXT PRIMARY KEY,
        version       INTEGER NOT NULL,
        items         INTEGER NOT NULL,
        updated_at_ms INTEGER
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS orders (
        source_id  TEXT NOT NULL,
        order_id   TEXT NOT NULL,
        sku        TEXT NOT NULL,
        qty        INTEGER NOT NULL,
        state      TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (source_id, order_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS orders_open ON orders(state) WHERE state = 'open'",
]

PG_SCHEMA = [sqlcompat.pg_ddl(s, bigint=("version", "updated_at_ms", "updated_ms")) for s in SCHEMA]
POSTGRES_MIGRATIONS = [Migration(110, "source_stock, source_feeds, orders", PG_SCHEMA)]

CLOSED = ("fulfilled", "cancelled")

FEEDS_LOCK = 0x6564_6765_0002  # advisory lock: one worker at a time writes sources, orders and caps


def setup(conn: sqlite3.Connection) -> int:
    """Create the tables; move a pre-sources database's warehouse feeds over. Returns rows moved."""
    from sync.hub.projection import create_tables

    create_tables(conn, SCHEMA)
    if sqlcompat.is_pg(conn):
        return 0  # the warehouse tables predate PostgreSQL storage
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "warehouse_feeds" not in tables:
        return 0
    conn.execute("INSERT OR IGNORE INTO source_feeds(source_id, version, items, updated_at_ms)"
                 " SELECT warehouse_id, version, items, NULL FROM warehouse_feeds")
    moved = conn.execute("INSERT OR IGNORE INTO source_stock(source_id, sku, available)"
                         " SELECT warehouse_id, sku, available FROM warehouse_stock").rowcount
    conn.execute("DROP TABLE warehouse_stock")
    conn.execute("DROP TABLE warehouse_feeds")
    return moved


def replace_source(conn: sqlite3.Connection, source_id: str, version: int, items: list[tuple[str, int]],
                   now_ms: int) -> bool:
    """Replace a source's list with a feed if its version is newer; return whether it did."""
    sqlcompat.xact_lock(conn, FEEDS_LOCK)
    held = conn.execute("SELECT version FROM source_feeds WHERE source_id = ?", (source_id,)).fetchone()
    if held is not None and version <= held[0]:
        return False
    conn.execute("DELETE FROM source_stock WHERE source_id = ?", (source_id,))
    conn.executemany("INSERT INTO source_stock(source_id, sku, available) VALUES (?,?,?)"
                     " ON CONFLICT(source_id, sku) DO UPDATE SET available = excluded.available",
                     [(source_id, sku, qty) for sku, qty in items])
    conn.execute("INSERT INTO source_feeds(source_id, version, items, updated_at_ms) VALUES (?,?,?,?)"
                 " ON CONFLICT(source_id) DO UPDATE SET version = excluded.version, items = excluded.items,"
                 " updated_at_ms = excluded.updated_at_ms", (source_id, version, len(items), now_ms))
    return True


def source_stock(conn: sqlite3.Connection, source_ids: Iterable[str]) -> tuple[dict, dict]:
    """Return (source_id -> sku -> available, source_id -> updated_at_ms) of the given sources.

    A source whose acceptance time is unknown (migrated) gets 0: older than any staleness.
    """
    wanted = set(source_ids)
    stock: dict[str, dict[str, int]] = {}
    for source_id, sku, available in conn.execute("SELECT source_id, sku, available FROM source_stock"):
        if source_id in wanted:
            stock.setdefault(source_id, {})[sku] = available
    updated = {source_id: at or 0 for source_id, at in conn.execute(
        "SELECT source_id, updated_at_ms FROM source_feeds") if source_id in wanted}
    return stock, updated


def apply_orders(conn: sqlite3.Connection, source_id: str, orders: list[tuple[str, str, int, str]],
                 now_ms: int) -> tuple[int, int]:
    """Record (order_id, sku, qty, state) orders of a source; return (applied, ignored).

    The latest state replaces the held one, except that a closed order (fulfilled or
    cancelled) is never reopened: an "open" for it is ignored. The same order sent twice
    changes nothing the second time.
    """
    sqlcompat.xact_lock(conn, FEEDS_LOCK)
    applied = ignored = 0
    for order_id, sku, qty, state in orders:
        held = conn.execute("SELECT sku, qty, state FROM orders WHERE source_id = ? AND order_id = ?",
                            (source_id, order_id)).fetchone()
        if held is not None and (held[2] in CLOSED and state == "open" or held == (sku, qty, state)):
            ignored += 1
            continue
        conn.execute("INSERT INTO orders(source_id, order_id, sku, qty, state, updated_ms) VALUES (?,?,?,?,?,?)"
                     " ON CONFLICT(source_id, order_id) DO UPDATE SET sku = excluded.sku, qty = excluded.qty,"
                     " state = excluded.state, updated_ms = excluded.updated_ms",
                     (source_id, order_id, sku, qty, state, now_ms))
        applied += 1
    return applied, ignored


def open_claims(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Return source_id (or "online") -> sku -> qty claimed by open orders."""
    out: dict[str, dict[str, int]] = {}
    for source_id, sku, qty in conn.execute(
            "SELECT source_id, sku, SUM(qty) FROM orders WHERE state = 'open' GROUP BY source_id, sku"):
        out.setdefault(source_id, {})[sku] = qty
    return out
