"""The sync process's read-only view of the agent's log (events.db).

The agent is the log's only writer; this process never writes it and never
checkpoints it (a read-only connection cannot). It learns of new events without any
message from the agent: `changed()` reads `PRAGMA data_version`, which SQLite bumps
for a connection whenever another connection has committed; polling it costs about a
microsecond of SQLite and touches no page (bench/sync.py reports the idle cost).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from common import chain
from common.errors import storage_error
from common.sqlite import open_readonly
from sync.ports import Batch

# The uplink's batch, cut and joined inside SQLite (one statement step each, the GIL
# released throughout) instead of a Python loop over the rows. The cut keeps the longest
# prefix after `after` within the event and byte caps (at least one event).
_BATCH_CUT = """
SELECT COUNT(*), MAX(seq) FROM (
    SELECT seq, SUM(LENGTH(body) + 1) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS size
    FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2)
WHERE size <= ?3 OR seq = ?1 + 1
"""
# An aggregate over an ordered subquery is not flattened (SQLite's rule 16), so the
# bodies are concatenated in seq order; the hub refuses a batch that is not in order.
_BATCH_JOIN = ("SELECT CAST(GROUP_CONCAT(body, ',') AS BLOB) FROM"
               " (SELECT body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq)")


class SqliteLogFeed:
    """`sync.ports.LogFeed` over events.db, read-only. One thread at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn = open_readonly(self.path, f"no log at {self.path} (does edge-agent run use this storage.path?)")
        self._version: int | None = None

    def close(self) -> None:
        self._conn.close()

    def _one(self, sql: str, args: tuple = ()) -> tuple:
        try:
            return self._conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise storage_error("read the log", exc) from exc

    def changed(self) -> bool:
        version = self._one("PRAGMA data_version")[0]
        if version == self._version:
            return False
        self._version = version
        return True

    def last_seq(self) -> int:
        # A table created by the agent after this connection opened is seen on the next read.
        try:
            return self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise storage_error("read the log", exc) from exc
        except sqlite3.Error as exc:
            raise storage_error("read the log", exc) from exc

    def store_id(self) -> str | None:
        """Return the store the log belongs to (None before the agent created it)."""
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row else None

    def incarnation(self) -> int:
        """The log's incarnation (meta `incarnation`; 1 for a log from before it)."""
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
        except sqlite3.Error:
            return 1
        return int(row[0]) if row else 1

    def hash_at(self, seq: int) -> bytes | None:
        """The log's chain hash at `seq` (GENESIS at 0, None beyond its end)."""
        if seq == 0:
            return chain.GENESIS
        row = self._one("SELECT hash FROM events WHERE seq = ?", (seq,))
        return row[0] if row else None

    def legacy_cursor(self) -> tuple[int, str | None] | None:
        """Return the cursor that older agents kept in events.db (`sync_cursor`), if there is one."""
        try:
            row = self._conn.execute("SELECT acked_seq, last_ack_at FROM sync_cursor WHERE id = 1").fetchone()
        except sqlite3.Error:
            return None
        return (row[0], row[1]) if row else None

    def batch(self, after_seq: int, max_events: int, max_bytes: int) -> Batch | None:
        """The next batch after `after_seq`: each body exactly as stored, with the chain hashes.

        Bodies at an older schema go as they are (the hub's readers upcast on read), so the
        hub holds the bytes the chain covers and can check it (docs/protocol.md, Hash chain).
        """
        count, last = self._one(_BATCH_CUT, (after_seq, max_events, max_bytes))
        if not count:
            return None
        prev_hash, last_hash = self._hashes(after_seq, last)
        return Batch(after_seq + 1, last, count, self._one(_BATCH_JOIN, (after_seq, last))[0], prev_hash, last_hash)

    def _hashes(self, after_seq: int, last: int) -> tuple[bytes, bytes]:
        try:
            rows = dict(self._conn.execute("SELECT seq, hash FROM events WHERE seq IN (?, ?)", (after_seq, last)))
        except sqlite3.Error as exc:
            raise storage_error("read the log", exc) from exc
        return (rows[after_seq] if after_seq else chain.GENESIS), rows[last]
