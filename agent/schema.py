"""The agent database's tables, pragmas and the projection-checkpoint statement.

`events` is the truth: append-only (triggers refuse UPDATE and DELETE), gapless seq,
each row's `hash` = sha256(previous hash + body), where body is the event's canonical
JSON. The columns beside the body (sku, rid, d_floor, d_backroom, d_reserved) are the
event's effect, derived at append and checked against the body by `verify`; they let
SQLite rebuild and time-travel the projections with sums instead of a Python fold.
"""

from __future__ import annotations

import sqlite3

GENESIS = bytes(32)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    command_id TEXT NOT NULL,
    type       TEXT NOT NULL,
    schema     INTEGER NOT NULL,
    sku        TEXT NOT NULL,
    rid        TEXT,
    d_floor    INTEGER NOT NULL,
    d_backroom INTEGER NOT NULL,
    d_reserved INTEGER NOT NULL,
    body       BLOB NOT NULL,
    hash       BLOB NOT NULL
);
-- No index by SKU on events: one would take a random B-tree page per appended event,
-- about a third of what a commit writes. Time travel walks the seq range after the
-- nearest projection checkpoint instead (see LogReader.stock_as_of). Logs created
-- before this change lose the index when they are next opened for writing.
DROP INDEX IF EXISTS events_by_sku;
CREATE INDEX IF NOT EXISTS events_by_rid ON events(rid) WHERE rid IS NOT NULL;

CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE refused'); END;

CREATE TABLE IF NOT EXISTS commands (
    command_id  TEXT PRIMARY KEY,
    body_hash   BLOB NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    recorded_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS stock (
    sku      TEXT PRIMARY KEY,
    floor    INTEGER NOT NULL,
    backroom INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY,
    sku            TEXT NOT NULL,
    qty            INTEGER NOT NULL,
    status         TEXT NOT NULL,
    opened_seq     INTEGER NOT NULL,
    closed_seq     INTEGER,
    opened_at      TEXT,              -- the reserved event's recorded_at (cap usage)
    expires_at     TEXT               -- the lease's end, the agent's time format; NULL: no lease
) WITHOUT ROWID;

-- Cap usage (docs/availability.md): per SKU and 15-minute slot of recorded_at, sold +
-- reserved - released (a release counts in its reservation's slot). Updated in the
-- append transaction, so a cap check is one range read of the period's slots.
CREATE TABLE IF NOT EXISTS cap_usage (
    sku  TEXT NOT NULL,
    slot INTEGER NOT NULL,            -- Unix ms // 900000
    qty  INTEGER NOT NULL,
    PRIMARY KEY (sku, slot)
) WITHOUT ROWID;

-- Time marks, for time travel by time: a row when a transaction's recorded_at passes
-- every earlier one, `seq` its first event. `high` grows with seq, so "the first event
-- recorded after T" is one probe: the first mark with high > T (docs/events.md).
CREATE TABLE IF NOT EXISTS time_marks (
    high TEXT PRIMARY KEY,            -- the running maximum of recorded_at, the agent's time format
    seq  INTEGER NOT NULL
) WITHOUT ROWID;

-- Projection checkpoints: at checkpoint `seq`, a row for every SKU changed since the
-- previous checkpoint. Stock as of N = the SKU's latest row at or before N plus the
-- sums of its events after that row's seq.
CREATE TABLE IF NOT EXISTS checkpoints (
    seq      INTEGER PRIMARY KEY,
    taken_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stock_checkpoints (
    sku      TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    floor    INTEGER NOT NULL,
    backroom INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (sku, seq)
) WITHOUT ROWID;
"""


# The slot of a time in SQL, as agent.inventory.slot_of computes it in Python.
_SLOT = "(CAST(ROUND((julianday({t}) - 2440587.5) * 86400000) AS INTEGER) / 900000)"

# Backfill of what the lease and cap columns hold, from the events: for a log created
# before they existed (migrate) and for a rebuild of the projections.
FILL_RESERVATION_TIMES = """
    UPDATE reservations SET
        opened_at = (SELECT json_extract(CAST(body AS TEXT), '$.recorded_at') FROM events e
                      WHERE e.seq = reservations.opened_seq),
        expires_at = (SELECT json_extract(CAST(body AS TEXT), '$.expires_at') FROM events e
                       WHERE e.seq = reservations.opened_seq)
"""
_BODY = "json_extract(CAST({e}.body AS TEXT), '$.{key}')"
# Cap usage replayed from the events alone: what `cap_usage` must hold (zero rows aside).
REPLAY_CAP_USAGE = f"""
    SELECT sku, slot, SUM(qty) AS qty FROM (
        SELECT e.sku, {_SLOT.format(t=_BODY.format(e="e", key="recorded_at"))} AS slot,
               {_BODY.format(e="e", key="qty")} AS qty
          FROM events e WHERE e.type IN ('sold', 'reserved')
        UNION ALL
        SELECT o.sku, {_SLOT.format(t=_BODY.format(e="o", key="recorded_at"))}, -{_BODY.format(e="o", key="qty")}
          FROM events e JOIN events o ON o.rid = e.rid AND o.type = 'reserved'
         WHERE e.type = 'reservation_released')
     GROUP BY sku, slot
"""
FILL_CAP_USAGE = "INSERT INTO cap_usage(sku, slot, qty) " + REPLAY_CAP_USAGE


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a log created by an older agent to this schema (inside the caller's transaction).

    Adds the reservations' lease and time columns and the cap usage table, filled from
    the events; a no-op on a current log.
    """
    if (conn.execute("SELECT 1 FROM time_marks LIMIT 1").fetchone() is None
            and conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None):
        fill_time_marks(conn)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(reservations)")}
    if "opened_at" in columns:
        return
    conn.execute("ALTER TABLE reservations ADD COLUMN opened_at TEXT")
    conn.execute("ALTER TABLE reservations ADD COLUMN expires_at TEXT")
    conn.execute(FILL_RESERVATION_TIMES)
    conn.execute("DELETE FROM cap_usage")
    conn.execute(FILL_CAP_USAGE)


def fill_time_marks(conn: sqlite3.Connection) -> None:
    """Build `time_marks` from the commands (every event of a command shares its recorded_at)."""
    high = ""
    marks = []
    for first_seq, recorded_at in conn.execute("SELECT first_seq, recorded_at FROM commands ORDER BY first_seq"):
        if recorded_at > high:
            high = recorded_at
            marks.append((high, first_seq))
    conn.executemany("INSERT INTO time_marks(high, seq) VALUES (?, ?)", marks)


def mark_time(conn: sqlite3.Connection, recorded_at: str, first_seq: int) -> None:
    """Record a transaction's recorded_at when it passes every earlier one (in its transaction)."""
    conn.execute("INSERT INTO time_marks(high, seq) SELECT ?1, ?2"
                 " WHERE ?1 > COALESCE((SELECT MAX(high) FROM time_marks), '')", (recorded_at, first_seq))


LEASE_INDEX_SQL = """
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations(expires_at)
    WHERE status = 'open' AND expires_at IS NOT NULL;
"""


def apply_pragmas(conn: sqlite3.Connection, synchronous: str) -> None:
    """Set WAL, the durability level and a busy timeout on the writer connection."""
    sync = synchronous.upper()
    if sync not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError(f"storage.synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"could not switch to WAL (journal_mode is {mode})")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("PRAGMA busy_timeout=5000")
    # Checkpoints run from this connection only, on our schedule and at close.
    conn.execute("PRAGMA wal_autocheckpoint=1000")


def take_checkpoint(conn: sqlite3.Connection, prev_seq: int, seq: int, taken_at: str) -> None:
    """Record every SKU changed after `prev_seq` as of `seq` (inside the caller's transaction)."""
    conn.execute(
        "INSERT INTO stock_checkpoints(sku, seq, floor, backroom, reserved, last_seq)"
        " SELECT sku, ?, floor, backroom, reserved, last_seq FROM stock WHERE last_seq > ?",
        (seq, prev_seq))
    conn.execute("INSERT INTO checkpoints(seq, taken_at) VALUES (?, ?)", (seq, taken_at))
