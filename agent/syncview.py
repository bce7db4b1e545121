"""The agent's read-only view of the sync process's database (sync.db).

`edge-agent sync` is sync.db's only writer (sync/state.py owns its tables); the agent
opens it read-only, like the log's readers, so a kiosk's availability answer, the catalog
search and GET /v1/sync are point reads on the event loop that never wait on the network
or on a snapshot being applied: WAL lets them see the last committed snapshot while a new
one is written, never a mix. Before sync has ever run there is no file: every answer is
then "nothing held", and the file is looked for again on the next read.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable

import msgspec

from common import clock
from common.errors import StorageError, storage_error
from common.sqlite import open_readonly

SCHEMA_VERSION = "1"   # the shape of sync.db this reader understands (sync/state.py)

_STATUS_KEYS = ("connected", "reconnects", "sent_seq", "inflight_batches", "resends", "rewinds",
                "ack_alarms", "alarm", "events_sent")
_NOTHING = {"acked_seq": 0, "last_ack_at": None, "connected": False, "sent_seq": 0, "inflight_batches": 0,
            "reconnects": 0, "resends": 0, "rewinds": 0, "ack_alarms": 0, "alarm": None, "events_sent": 0,
            "beat_age_s": None, "pid": None, "counters": {}, "link_alarm": None}


class _Nearby(msgspec.Struct):
    nearby: list[dict]


_item_decoder = msgspec.json.Decoder(_Nearby)


class SqliteSyncView:
    """`agent.ports.SyncView` over sync.db, read-only; see the module docstring."""

    def __init__(self, path: str | Path, *, max_age_s: float = 120.0, now: Callable[[], float] = time.time):
        self.path = Path(path)
        self.max_age_s = max_age_s
        self._now = now
        self._conn: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and self.path.exists():
            conn = open_readonly(self.path, f"no sync database at {self.path}")
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            except sqlite3.Error as exc:
                conn.close()
                if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
                    return None   # created, its tables not yet committed
                raise storage_error(f"read {self.path}", exc) from exc
            if row is None:
                conn.close()
                return None
            if row[0] != SCHEMA_VERSION:
                conn.close()
                raise StorageError(f"storage: {self.path} has sync schema {row[0]}, this agent reads"
                                   f" {SCHEMA_VERSION} (edge-agent run and edge-agent sync of one version?)")
            self._conn = conn
        return self._conn

    def _read(self, what: str, fn: Callable[[sqlite3.Connection], object]):
        conn = self._connection()
        if conn is None:
            return None
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise storage_error(f"read {what} from {self.path.name}", exc) from exc

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        def read(conn: sqlite3.Connection):
            conn.execute("BEGIN")
            try:
                cursor = conn.execute("SELECT acked_seq, last_ack_at FROM cursor WHERE id = 1").fetchone()
                status = conn.execute(
                    "SELECT beat_at, pid, counters, " + ", ".join(_STATUS_KEYS) + " FROM status WHERE id = 1"
                ).fetchone()
                try:
                    alarm = conn.execute("SELECT code, message, since FROM link_alarm WHERE id = 1").fetchone()
                except sqlite3.OperationalError as exc:
                    if "no such table" not in str(exc):
                        raise
                    alarm = None   # written by a sync process from before link alarms
            finally:
                conn.execute("COMMIT")
            return cursor, status, alarm

        found = self._read("the sync status", read)
        answer = dict(_NOTHING, counters={})
        if found is None:
            return answer
        cursor, status, alarm = found
        if alarm is not None:
            answer["link_alarm"] = dict(zip(("code", "message", "since"), alarm))
        if cursor is not None:
            answer["acked_seq"], answer["last_ack_at"] = cursor
        if status is not None:
            beat_at, pid, counters, *values = status
            answer.update(zip(_STATUS_KEYS, values))
            answer["connected"] = bool(answer["connected"])
            answer["beat_age_s"] = round(max(0.0, self._now() - beat_at), 3)
            answer["pid"] = pid
            answer["counters"] = msgspec.json.decode(counters)
        return answer

    # ---------------------------------------------------------- snapshot

    def snapshot_meta(self) -> dict | None:
        head = self._read("the snapshot", lambda conn: conn.execute(
            "SELECT version, generated_at FROM availability_snapshot WHERE id = 1").fetchone())
        return self._describe(*head) if head else None

    def answer(self, sku: str) -> tuple[list[dict], int | None, dict | None]:
        def read(conn: sqlite3.Connection):
            # One read transaction: an apply committing in between cannot pair the new
            # items with the previous snapshot's version.
            conn.execute("BEGIN")
            try:
                row = conn.execute("SELECT item, online FROM availability_items WHERE sku = ?", (sku,)).fetchone()
                head = conn.execute("SELECT version, generated_at FROM availability_snapshot WHERE id = 1").fetchone()
            finally:
                conn.execute("COMMIT")
            return row, head

        found = self._read("availability", read)
        if found is None:
            return [], None, None
        row, head = found
        nearby, online = (_item_decoder.decode(row[0]).nearby, row[1]) if row else ([], None)
        return nearby, online, self._describe(*head) if head else None

    def _describe(self, version: int, generated_at: str) -> dict:
        """{version, generated_at, age_s, stale}: age from the hub's generated_at to this clock, never negative."""
        try:
            age = max(0.0, self._now() - clock.parse_rfc3339(generated_at))
        except ValueError:
            return {"version": version, "generated_at": generated_at, "age_s": None, "stale": True}
        return {"version": version, "generated_at": generated_at, "age_s": round(age, 3),
                "stale": age > self.max_age_s}

    # ----------------------------------------------------------- catalog

    def name(self, sku: str) -> str | None:
        row = self._read("the catalog", lambda conn: conn.execute(
            "SELECT name FROM catalog_items WHERE sku = ?", (sku,)).fetchone())
        return row[0] if row else None

    def search(self, text: str, limit: int = 20) -> list[dict]:
        text = text.strip()
        if not text:
            return []
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._read("the catalog", lambda conn: conn.execute(
            "SELECT sku, name FROM catalog_items WHERE name LIKE ?1 ESCAPE '\\' OR sku LIKE ?1 ESCAPE '\\'"
            " ORDER BY (sku LIKE ?2 ESCAPE '\\') DESC, sku LIMIT ?3",
            (pattern, pattern[1:], max(0, limit))).fetchall())
        return [{"sku": sku, "name": name} for sku, name in rows or ()]
