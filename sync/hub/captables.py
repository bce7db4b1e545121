"""The hub's cap tables: caps as set, each store's cap use by local day, allowances published (SQL).

Every function takes a connection inside the caller's transaction (sqlite3, or a
`sync.hub.sqlcompat.PgConn` on PostgreSQL: the same SQL; `PG_SCHEMA` is its DDL).

* `caps`: one row per (sku, origin). Origin "file" rows come from `[caps] path`, "mqtt"
  rows from `P/caps/{sku}`; a SKU's MQTT cap overrides its file cap (`effective_caps`).
* `cap_sold` / `cap_reserved`: the cap usage rule (docs/availability.md) kept by local
  day in the store's time zone, filled by the ingest hook in the same transaction as the
  events: `sold` adds its qty to its day; `reserved` is one row per reservation, and a
  `reservation_released` marks it released (so it no longer counts in the day it was
  made). Fulfilment changes nothing. A period's use is the sum over its local days.
* `cap_grants`: (sku, store_id, snapshot version, allowance) each time a store's
  allowance for a chain cap changed in a published snapshot, persisted before the
  publish; `caps.in_force_after` reads it.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Callable, Iterable, Mapping

from agent.events import EventDecodeError, ReservationReleased, Reserved, Sold, decode_event
from sync.hub import caps as capcore
from sync.hub import sqlcompat
from sync.hub.migrations import Migration
from sync.hub.storage import Upsert

log = logging.getLogger("edge_hub.caps")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS caps (
        sku        TEXT NOT NULL,
        origin     TEXT NOT NULL,
        cap_limit  INTEGER NOT NULL,
        period     TEXT NOT NULL,
        scope      TEXT NOT NULL,
        store_id   TEXT,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (sku, origin)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS cap_sold (
        store_id TEXT NOT NULL,
        sku      TEXT NOT NULL,
        day      TEXT NOT NULL,
        qty      INTEGER NOT NULL,
        PRIMARY KEY (store_id, sku, day)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS cap_reserved (
        store_id       TEXT NOT NULL,
        reservation_id TEXT NOT NULL,
        sku            TEXT NOT NULL,
        day            TEXT NOT NULL,
        qty            INTEGER NOT NULL,
        released       INTEGER NOT NULL,
        PRIMARY KEY (store_id, reservation_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS cap_reserved_sku ON cap_reserved(store_id, sku, day)",
    """CREATE TABLE IF NOT EXISTS cap_grants (
        sku       TEXT NOT NULL,
        store_id  TEXT NOT NULL,
        version   INTEGER NOT NULL,
        allowance INTEGER NOT NULL,
        PRIMARY KEY (sku, store_id, version)
    ) WITHOUT ROWID""",
]


_FEEDS_LOCK = 0x6564_6765_0002  # feeds.FEEDS_LOCK: caps are written like the other feeds

PG_SCHEMA = [sqlcompat.pg_ddl(s, bigint=("updated_ms", "version")) for s in SCHEMA]
POSTGRES_MIGRATIONS = [Migration(120, "caps, cap_sold, cap_reserved, cap_grants", PG_SCHEMA)]


def setup(conn: sqlite3.Connection, day_of: Callable[[str, str], str]) -> int:
    """Create the tables; the first time, fold every held event into the day buckets.

    `day_of(store_id, recorded_at)` returns the event's local date. Returns events folded.
    """
    from sync.hub.projection import create_tables

    create_tables(conn, SCHEMA)
    if conn.execute("SELECT 1 FROM hub_meta WHERE key = 'cap_usage'").fetchone():
        return 0
    folded = 0
    for (store_id,) in conn.execute("SELECT DISTINCT store_id FROM events").fetchall():
        rows = conn.execute("SELECT body FROM events WHERE store_id = ? ORDER BY seq", (store_id,))
        batch = [(None, body) for (body,) in rows]
        apply_usage(conn, store_id, batch, day_of)
        folded += len(batch)
    conn.execute("INSERT INTO hub_meta(key, value) VALUES ('cap_usage', 'v1')")
    return folded


# ---------------------------------------------------------------- usage hook


def _facts(events: Iterable[tuple[object, bytes]]):
    """Yield (kind, sku, qty, recorded_at, reservation_id) of the events that count toward caps."""
    for head, body in events:
        kind = getattr(head, "__struct_config__", None)
        tag = kind.tag if kind is not None else None
        if tag in ("sold", "reserved", "reservation_released"):
            yield tag, head.sku, head.qty, head.recorded_at, getattr(head, "reservation_id", "")
            continue
        if tag is not None and hasattr(head, "sku"):
            continue  # another type of the narrow view: no cap use
        try:
            event = decode_event(body)
        except (EventDecodeError, TypeError):
            continue  # the projection logs an event it cannot read
        if isinstance(event, Sold):
            yield "sold", event.sku, event.qty, event.recorded_at, ""
        elif isinstance(event, Reserved):
            yield "reserved", event.sku, event.qty, event.recorded_at, event.reservation_id
        elif isinstance(event, ReservationReleased):
            yield "reservation_released", event.sku, event.qty, event.recorded_at, event.reservation_id


def usage_rows(store_id: str, events: Iterable[tuple[object, bytes]],
               day_of: Callable[[str, str], str]) -> list[Upsert]:
    """The cap usage ingest hook (sync/hub/storage.py): newly stored events' cap use as rows
    for `cap_sold` and `cap_reserved`, in event order (idempotent per event). Pure."""
    sold: dict[tuple[str, str], int] = {}
    out: list[Upsert] = []
    for kind, sku, qty, recorded_at, reservation_id in _facts(events):
        if kind == "sold":
            key = (sku, day_of(store_id, recorded_at))
            sold[key] = sold.get(key, 0) + qty
        elif kind == "reserved":
            out.append(Upsert("cap_reserved", _RESERVED_COLUMNS, ("store_id", "reservation_id"),
                              [(store_id, reservation_id, sku, day_of(store_id, recorded_at), qty, 0)],
                              replace=("sku", "day", "qty")))
        else:  # a release stored before its reservation (after a gap) still marks it
            out.append(Upsert("cap_reserved", _RESERVED_COLUMNS, ("store_id", "reservation_id"),
                              [(store_id, reservation_id, sku, "", 0, 1)], replace=("released",)))
    if sold:
        out.append(Upsert("cap_sold", ("store_id", "sku", "day", "qty"), ("store_id", "sku", "day"),
                          [(store_id, sku, day, qty) for (sku, day), qty in sold.items()], add=("qty",)))
    return out


_RESERVED_COLUMNS = ("store_id", "reservation_id", "sku", "day", "qty", "released")


def apply_usage(conn: sqlite3.Connection, store_id: str, events: Iterable[tuple[object, bytes]],
                day_of: Callable[[str, str], str]) -> None:
    """Add newly stored events' cap use to the day buckets (SQLite, in the caller's transaction)."""
    for upsert in usage_rows(store_id, events, day_of):
        conn.executemany(upsert.sql("?"), upsert.rows)


def used(conn: sqlite3.Connection, store_id: str, sku: str, first_day: str, after_day: str) -> int:
    """Return a store's cap use of a SKU over the local days [first_day, after_day)."""
    sold = conn.execute("SELECT COALESCE(SUM(qty), 0) FROM cap_sold WHERE store_id = ? AND sku = ?"
                        " AND day >= ? AND day < ?", (store_id, sku, first_day, after_day)).fetchone()[0]
    reserved = conn.execute("SELECT COALESCE(SUM(qty), 0) FROM cap_reserved WHERE store_id = ? AND sku = ?"
                            " AND day >= ? AND day < ? AND released = 0",
                            (store_id, sku, first_day, after_day)).fetchone()[0]
    return sold + reserved


# ------------------------------------------------------------------- caps


def set_cap(conn: sqlite3.Connection, cap: capcore.Cap, origin: str, now_ms: int) -> bool:
    """Set a SKU's cap of an origin; return whether anything changed."""
    sqlcompat.xact_lock(conn, _FEEDS_LOCK)
    row = (cap.limit, cap.period, cap.scope, cap.store_id)
    held = conn.execute("SELECT cap_limit, period, scope, store_id FROM caps WHERE sku = ? AND origin = ?",
                        (cap.sku, origin)).fetchone()
    if held == row:
        return False
    conn.execute("INSERT INTO caps(sku, origin, cap_limit, period, scope, store_id, updated_ms) VALUES (?,?,?,?,?,?,?)"
                 " ON CONFLICT(sku, origin) DO UPDATE SET cap_limit = excluded.cap_limit, period = excluded.period,"
                 " scope = excluded.scope, store_id = excluded.store_id, updated_ms = excluded.updated_ms",
                 (cap.sku, origin, *row, now_ms))
    return True


def clear_cap(conn: sqlite3.Connection, sku: str, origin: str) -> bool:
    """Clear a SKU's cap of an origin; with no cap left, forget its allowance history. Return whether it held one."""
    sqlcompat.xact_lock(conn, _FEEDS_LOCK)
    gone = conn.execute("DELETE FROM caps WHERE sku = ? AND origin = ?", (sku, origin)).rowcount > 0
    if gone and conn.execute("SELECT 1 FROM caps WHERE sku = ?", (sku,)).fetchone() is None:
        conn.execute("DELETE FROM cap_grants WHERE sku = ?", (sku,))
    return gone


def replace_file_caps(conn: sqlite3.Connection, caps: list[capcore.Cap], now_ms: int) -> int:
    """Make the "file" caps exactly `caps`; return how many rows changed."""
    changed = 0
    keep = {cap.sku for cap in caps}
    for (sku,) in conn.execute("SELECT sku FROM caps WHERE origin = 'file'").fetchall():
        if sku not in keep:
            changed += clear_cap(conn, sku, "file")
    for cap in caps:
        changed += set_cap(conn, cap, "file", now_ms)
    return changed


def effective_caps(conn: sqlite3.Connection) -> dict[str, tuple[capcore.Cap, str]]:
    """Return sku -> (its cap, origin): the MQTT cap where there is one, else the file's."""
    out: dict[str, tuple[capcore.Cap, str]] = {}
    for sku, origin, limit, period, scope, store_id in conn.execute(
            "SELECT sku, origin, cap_limit, period, scope, store_id FROM caps ORDER BY sku, origin = 'mqtt'"):
        out[sku] = (capcore.Cap(sku, limit, period, scope, store_id), origin)
    return out


# ----------------------------------------------------------------- grants


def grant_history(conn: sqlite3.Connection, skus: Iterable[str]) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Return sku -> store_id -> [(version, allowance), ...] in version order."""
    out: dict[str, dict[str, list[tuple[int, int]]]] = {}
    wanted = set(skus)
    for sku, store_id, version, allowance in conn.execute(
            "SELECT sku, store_id, version, allowance FROM cap_grants ORDER BY sku, store_id, version"):
        if sku in wanted:
            out.setdefault(sku, {}).setdefault(store_id, []).append((version, allowance))
    return out


def record_grants(conn: sqlite3.Connection, store_id: str, version: int, grants: Mapping[str, int],
                  confirmed: int | None) -> None:
    """Persist a store's changed allowances under the snapshot version about to be published.

    Rows older than the one in force at the store's `confirmed` version are dropped: they
    can no longer be acted on.
    """
    conn.executemany("INSERT INTO cap_grants(sku, store_id, version, allowance) VALUES (?,?,?,?)"
                     " ON CONFLICT(sku, store_id, version) DO UPDATE SET allowance = excluded.allowance",
                     [(sku, store_id, version, allowance) for sku, allowance in grants.items()])
    if confirmed is not None:
        conn.execute("DELETE FROM cap_grants WHERE store_id = ? AND version < (SELECT MAX(g.version)"
                     " FROM cap_grants g WHERE g.store_id = cap_grants.store_id AND g.sku = cap_grants.sku"
                     " AND g.version <= ?)", (store_id, confirmed))
