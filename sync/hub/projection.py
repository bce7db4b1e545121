"""The hub's availability tables: each store's stock projection, warehouse feeds, publish state.

Every function takes a sqlite3 connection inside the caller's transaction (the hub
store's ingest transaction for `apply_events`, `HubStore.run` for the others), so the
projection moves in the same commit as the events that move it.

The projection sums each event's effect (`agent.inventory.effect`, which depends on the
event alone), so it does not care about arrival order: events that arrive after a gap
count at once, and each stored event is applied exactly once because the hook only sees
the events stored by that transaction (duplicates and conflicts are not).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Iterable

from agent.events import EventDecodeError, decode_event
from agent.inventory import effect
from sync.hub.availability import Published

log = logging.getLogger("edge_hub.projection")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS hub_stock (
        store_id TEXT NOT NULL,
        sku      TEXT NOT NULL,
        floor    INTEGER NOT NULL,
        backroom INTEGER NOT NULL,
        reserved INTEGER NOT NULL,
        PRIMARY KEY (store_id, sku)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS warehouse_stock (
        warehouse_id TEXT NOT NULL,
        sku          TEXT NOT NULL,
        available    INTEGER NOT NULL,
        PRIMARY KEY (warehouse_id, sku)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS warehouse_feeds (
        warehouse_id TEXT PRIMARY KEY,
        version      INTEGER NOT NULL,
        items        INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS availability_published (
        store_id        TEXT PRIMARY KEY,
        version         INTEGER NOT NULL,
        digest          BLOB NOT NULL,
        generated_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS hub_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
]


def setup(conn: sqlite3.Connection) -> int:
    """Create the tables; build the projection from every held event the first time.

    Returns the number of events folded by that first build (0 afterwards).
    """
    for statement in SCHEMA:
        conn.execute(statement)
    if conn.execute("SELECT 1 FROM hub_meta WHERE key = 'projection'").fetchone():
        return 0
    folded = 0
    stores = [row[0] for row in conn.execute("SELECT DISTINCT store_id FROM events")]
    for store_id in stores:
        bodies = [row[0] for row in conn.execute("SELECT body FROM events WHERE store_id = ?", (store_id,))]
        apply_events(conn, store_id, bodies)
        folded += len(bodies)
    conn.execute("INSERT INTO hub_meta(key, value) VALUES ('projection', 'v1')")
    return folded


def apply_events(conn: sqlite3.Connection, store_id: str, bodies: Iterable[bytes]) -> None:
    """Add the effect of newly stored events to the store's projection (an ingest hook).

    An event the hub cannot read (a schema newer than this hub knows) is logged and left
    out of the projection; it is still stored and acked.
    """
    deltas: dict[str, list[int]] = {}
    for body in bodies:
        try:
            eff = effect(decode_event(body))
        except (EventDecodeError, TypeError) as exc:
            log.error("hub: projection skips an event of %s it cannot read: %s", store_id, exc)
            continue
        row = deltas.setdefault(eff.sku, [0, 0, 0])
        row[0] += eff.floor
        row[1] += eff.backroom
        row[2] += eff.reserved
    if deltas:
        conn.executemany(
            "INSERT INTO hub_stock(store_id, sku, floor, backroom, reserved) VALUES (?,?,?,?,?)"
            " ON CONFLICT(store_id, sku) DO UPDATE SET floor = floor + excluded.floor,"
            " backroom = backroom + excluded.backroom, reserved = reserved + excluded.reserved",
            [(store_id, sku, f, b, r) for sku, (f, b, r) in deltas.items()])


def available_by_store(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Return store_id -> sku -> available (the contract's max(0, floor + backroom - reserved))."""
    out: dict[str, dict[str, int]] = {}
    for store_id, sku, available in conn.execute(
            "SELECT store_id, sku, MAX(0, floor + backroom - reserved) FROM hub_stock"):
        out.setdefault(store_id, {})[sku] = available
    return out


def warehouse_feeds(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Return warehouse_id -> sku -> available, from the latest feed of each warehouse."""
    out: dict[str, dict[str, int]] = {}
    for warehouse_id, sku, available in conn.execute("SELECT warehouse_id, sku, available FROM warehouse_stock"):
        out.setdefault(warehouse_id, {})[sku] = available
    return out


def replace_warehouse(conn: sqlite3.Connection, warehouse_id: str, version: int,
                      items: list[tuple[str, int]]) -> bool:
    """Replace a warehouse's stock with a feed if its version is newer; return whether it did."""
    held = conn.execute("SELECT version FROM warehouse_feeds WHERE warehouse_id = ?", (warehouse_id,)).fetchone()
    if held is not None and version <= held[0]:
        return False
    conn.execute("DELETE FROM warehouse_stock WHERE warehouse_id = ?", (warehouse_id,))
    conn.executemany("INSERT OR REPLACE INTO warehouse_stock(warehouse_id, sku, available) VALUES (?,?,?)",
                     [(warehouse_id, sku, qty) for sku, qty in items])
    conn.execute("INSERT INTO warehouse_feeds(warehouse_id, version, items) VALUES (?,?,?)"
                 " ON CONFLICT(warehouse_id) DO UPDATE SET version = excluded.version, items = excluded.items",
                 (warehouse_id, version, len(items)))
    return True


def published(conn: sqlite3.Connection) -> dict[str, Published]:
    """Return what was last published per store."""
    return {store_id: Published(version, digest, at) for store_id, version, digest, at in conn.execute(
        "SELECT store_id, version, digest, generated_at_ms FROM availability_published")}


def record_published(conn: sqlite3.Connection, store_id: str, version: int, digest: bytes,
                     generated_at_ms: int) -> None:
    """Persist a store's published snapshot (version only grows: a lower one is refused)."""
    held = conn.execute("SELECT version FROM availability_published WHERE store_id = ?", (store_id,)).fetchone()
    if held is not None and version <= held[0]:
        raise ValueError(f"availability: version {version} for {store_id} is not above {held[0]}")
    conn.execute("INSERT INTO availability_published(store_id, version, digest, generated_at_ms)"
                 " VALUES (?,?,?,?) ON CONFLICT(store_id) DO UPDATE SET version = excluded.version,"
                 " digest = excluded.digest, generated_at_ms = excluded.generated_at_ms",
                 (store_id, version, digest, generated_at_ms))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM hub_meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO hub_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (key, value))
