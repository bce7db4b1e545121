"""Read-only queries on the agent's database.

A point read (one SKU's stock) costs a few microseconds in SQLite, far less than a hop
to a worker thread, so the service runs these on the event loop through a read-only
connection. WAL lets them proceed while the writer commits; a read-only connection can
never checkpoint, so the writer stays the only checkpointer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

from agent import events as ev
from common import sqlite as common_sqlite
from common.errors import storage_error


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """Open the log read-only; raises StorageError when there is no log there."""
    return common_sqlite.open_readonly(path, f"no log at {path} (run `edge-agent init` or `edge-agent run` first)")


def stock_row(sku: str, floor: int, backroom: int, reserved: int, last_seq: int) -> dict:
    """Return the API's stock object for one SKU."""
    return {
        "sku": sku, "floor": floor, "backroom": backroom, "reserved": reserved,
        "available": max(0, floor + backroom - reserved), "last_seq": last_seq,
    }


def current_body(schema: int, body: bytes) -> bytes:
    """Return an event body at the current schema (re-encoded only when it was older)."""
    if schema == ev.CURRENT_SCHEMA:
        return body
    return ev.encode(ev.decode_event(body))


_LATEST_CHECKPOINT = "SELECT COALESCE(MAX(seq), 0) FROM checkpoints WHERE seq <= ?"
_SKU_AT_CHECKPOINT = ("SELECT floor, backroom, reserved, last_seq FROM stock_checkpoints"
                      " WHERE sku = ? AND seq <= ? ORDER BY seq DESC LIMIT 1")
# The events table has no index by SKU (it would cost a random B-tree page per append):
# the sums walk the seq range after the checkpoint and filter by SKU.
AS_OF_SUMS = ("SELECT COUNT(*), COALESCE(SUM(d_floor), 0), COALESCE(SUM(d_backroom), 0),"
              " COALESCE(SUM(d_reserved), 0), MAX(seq) FROM events WHERE seq > ? AND seq <= ? AND sku = ?")


class LogReader:
    """Read-only access to the log and its projections. Not for concurrent threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = open_readonly(self.path)

    def close(self) -> None:
        self.conn.close()

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        try:
            return self.conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise storage_error("read", exc) from exc

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read", exc) from exc

    def last_seq(self) -> int:
        return self._one("SELECT COALESCE(MAX(seq), 0) FROM events")[0]

    def stock(self, sku: str) -> dict | None:
        """Return the current stock of a SKU, or None for a SKU never seen."""
        row = self._one("SELECT sku, floor, backroom, reserved, last_seq FROM stock WHERE sku = ?", (sku,))
        return stock_row(*row) if row else None

    def all_stock(self, after_sku: str = "", limit: int = 1_000_000) -> list[dict]:
        """Return stock rows in SKU order, after `after_sku` (for paging)."""
        rows = self._all("SELECT sku, floor, backroom, reserved, last_seq FROM stock WHERE sku > ?"
                         " ORDER BY sku LIMIT ?", (after_sku, limit))
        return [stock_row(*row) for row in rows]

    def stock_as_of(self, sku: str, seq: int) -> dict | None:
        """Return a SKU's stock after events 1..seq, or None when no event touched it by then.

        Starts from the latest projection checkpoint at or before `seq` and sums the
        SKU's events after it, found by a seq range on the primary key: the cost is
        bounded by one checkpoint interval, not by the log's length or the SKU's history.
        """
        start = self._one(_LATEST_CHECKPOINT, (seq,))[0]
        # The SKU's value at checkpoint `start` is its latest checkpoint row at or before
        # it: a checkpoint holds a row for every SKU changed since the previous one.
        base = self._one(_SKU_AT_CHECKPOINT, (sku, start)) if start else None
        floor, backroom, reserved, last = base if base else (0, 0, 0, 0)
        n, df, db, dr, mx = self._one(AS_OF_SUMS, (start, seq, sku))
        if not base and n == 0:
            return None
        return stock_row(sku, floor + df, backroom + db, reserved + dr, mx if n else last)

    def cap_used(self, sku: str, first_slot: int, end_slot: int) -> int:
        """Return the SKU's cap usage in slots first_slot <= slot < end_slot (agent.inventory)."""
        return self._one("SELECT COALESCE(SUM(qty), 0) FROM cap_usage WHERE sku = ? AND slot >= ? AND slot < ?",
                         (sku, first_slot, end_slot))[0]

    def seq_at(self, at: str) -> int:
        """Return the last seq of the log as it stood at time `at` (the agent's time format).

        That is the seq before the first event recorded after `at`, found by one probe of
        `time_marks`; with a clock that never went back, every event recorded at or before
        `at`. An event recorded after a jump back to a time <= `at` but appended after one
        recorded later than `at` is not included: the log's order is seq (docs/events.md).
        """
        row = self._one("SELECT seq FROM time_marks WHERE high > ? ORDER BY high LIMIT 1", (at,))
        return row[0] - 1 if row else self.last_seq()

    def expired_leases(self, now: str, limit: int = 500) -> list[tuple[str, str]]:
        """Return up to `limit` (reservation_id, expires_at) of open leases with expires_at <= now, oldest first.

        `now` is in the agent's time format (what the log writes as `expires_at`), so the
        comparison is the string order; the partial index on open leases answers it.
        """
        return self._all("SELECT reservation_id, expires_at FROM reservations"
                         " WHERE status = 'open' AND expires_at IS NOT NULL AND expires_at <= ?"
                         " ORDER BY expires_at LIMIT ?", (now, limit))

    def events_after(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Return up to `limit` (seq, body) pairs after `after_seq`, bodies at the current schema."""
        rows = self._all("SELECT seq, schema, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                         (after_seq, limit))
        return [(seq, current_body(schema, body)) for seq, schema, body in rows]

    def iter_bodies(self, after_seq: int = 0, chunk: int = 5000) -> Iterator[bytes]:
        """Yield every event body after `after_seq` in seq order (for export)."""
        while True:
            rows = self.events_after(after_seq, chunk)
            if not rows:
                return
            for _, body in rows:
                yield body
            after_seq = rows[-1][0]
