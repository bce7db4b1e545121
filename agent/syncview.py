"""The agent's read-only view of the sync process's database (sync.db).

`edge-agent sync` is sync.db's only writer (sync/state.py owns its tables); the agent
opens it read-only, like the log's readers, so a kiosk's availability answer, the catalog
search and GET /v1/sync are point reads on the event loop that never wait on the network
or on a snapshot being applied: WAL lets them see the last committed snapshot while a new
one is written, never a mix. Before sync has ever run there is no file: every answer is
then "nothing held", and the file is looked for again on the next read.

The log's writer thread reads the sales caps of a batch's SKUs at decide time through its
own view (`HeldCaps`): a read of sync.db never blocks or fails a write (see HeldCaps).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable, Literal

import msgspec

from agent.caps import Cap
from common import clock
from common.errors import StorageError, storage_error
from common.sqlite import open_readonly

log = logging.getLogger("edge_agent.syncview")

SCHEMA_VERSION = "4"   # the shape of sync.db this reader understands (sync/state.py)
# Older shapes it still reads: "1" has no caps and no validated sources (answered as none);
# "2" keeps each source's metadata in the item's `sources` list (no sources table).
# "3" is "4" without the cursor's ack mark, which this reader does not read.
READABLE = ("1", "2", "3", SCHEMA_VERSION)

_STATUS_KEYS = ("connected", "reconnects", "sent_seq", "inflight_batches", "resends", "rewinds",
                "ack_alarms", "alarm", "events_sent")
_NOTHING = {"acked_seq": 0, "last_ack_at": None, "connected": False, "sent_seq": 0, "inflight_batches": 0,
            "reconnects": 0, "resends": 0, "rewinds": 0, "ack_alarms": 0, "alarm": None, "events_sent": 0,
            "beat_age_s": None, "pid": None, "counters": {}, "link_alarm": None}


class _Nearby(msgspec.Struct):
    nearby: list[dict]


class _Source(msgspec.Struct):
    source_id: str
    name: str
    kind: str
    available: int
    lead_time_s: int
    updated_at: str
    stale: bool
    stale_after_s: int | None = None


class _Full(msgspec.Struct):
    nearby: list[dict]
    # "3": source_id -> available (the rest is in availability_sources); "2": whole entries.
    sources: dict[str, int] | list[_Source] | None = None


_TABLE_SQL = ("SELECT source_id, name, kind, lead_time_s, updated_at, stale, stale_after_s"
              " FROM availability_sources ORDER BY position")


_item_decoder = msgspec.json.Decoder(_Nearby)
_full_decoder = msgspec.json.Decoder(_Full)
_cap_decoder = msgspec.json.Decoder(Cap)


def _cap_of(raw: bytes) -> Cap:
    return _cap_decoder.decode(raw)


def _joined(sources: dict[str, int] | list[_Source] | None, table: list[tuple]) -> list[dict]:
    """An item's sources as the answer lists them: its quantities joined with the sources table."""
    if not sources:
        return []
    if isinstance(sources, list):   # schema "2": the item carried whole entries
        return [msgspec.structs.asdict(s) for s in sources]
    return [{"source_id": source_id, "name": name, "kind": kind, "available": sources[source_id],
             "lead_time_s": lead_time_s, "updated_at": updated_at, "stale": bool(stale),
             "stale_after_s": stale_after_s}
            for source_id, name, kind, lead_time_s, updated_at, stale, stale_after_s in table
            if source_id in sources]


class SqliteSyncView:
    """`agent.ports.SyncView` over sync.db, read-only; see the module docstring."""

    def __init__(self, path: str | Path, *, max_age_s: float = 120.0, now: Callable[[], float] = time.time,
                 busy_timeout_ms: int = 5000):
        self.path = Path(path)
        self.max_age_s = max_age_s
        self._now = now
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._schema: str | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is not None and self._schema != SCHEMA_VERSION:
            # The sync process migrates an older file at its start: look again.
            self._schema = self._schema_of(self._conn)
        if self._conn is None and self.path.exists():
            conn = open_readonly(self.path, f"no sync database at {self.path}")
            if self._busy_timeout_ms != 5000:
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
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
            if row[0] not in READABLE:
                conn.close()
                raise StorageError(f"storage: {self.path} has sync schema {row[0]}, this agent reads"
                                   f" {', '.join(READABLE)} (edge-agent run and edge-agent sync of one version?)")
            self._conn, self._schema = conn, row[0]
        return self._conn

    def _schema_of(self, conn: sqlite3.Connection) -> str:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.Error as exc:
            raise storage_error(f"read {self.path}", exc) from exc
        if row is None or row[0] not in READABLE:
            raise StorageError(f"storage: {self.path} has sync schema {row[0] if row else None},"
                               f" this agent reads {', '.join(READABLE)}")
        return row[0]

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

    def item(self, sku: str) -> dict:
        """Return {nearby, online, sources, cap, snapshot} for a SKU, all from one committed snapshot.

        `sources`: each source listing the SKU, in the hub's order, as {source_id, name,
        kind, available, lead_time_s, updated_at, stale, stale_after_s}: the item's
        quantity joined with the snapshot's sources table (the hub's `stale` judgment
        included); `cap` is a Cap or None. A sync.db of schema "1" answers no sources and
        no cap.
        """
        def read(conn: sqlite3.Connection):
            schema = self._schema   # known once the connection is open
            cap_column = "cap" if schema != "1" else "NULL"
            conn.execute("BEGIN")  # the item, its sources table and the head of one snapshot
            try:
                row = conn.execute(f"SELECT item, online, {cap_column} FROM availability_items WHERE sku = ?",
                                   (sku,)).fetchone()
                head = conn.execute("SELECT version, generated_at FROM availability_snapshot WHERE id = 1").fetchone()
                table = conn.execute(_TABLE_SQL).fetchall() if row is not None and schema in ("3", "4") else []
            finally:
                conn.execute("COMMIT")
            return row, head, table, schema

        found = self._read("availability", read)
        answer = {"nearby": [], "online": None, "sources": [], "cap": None, "snapshot": None}
        if found is None:
            return answer
        row, head, table, schema = found
        if row is not None:
            item = _full_decoder.decode(row[0])
            answer["nearby"], answer["online"] = item.nearby, row[1]
            if schema != "1":
                answer["sources"] = _joined(item.sources, table)
                answer["cap"] = _cap_of(row[2]) if row[2] is not None else None
        answer["snapshot"] = self._describe(*head) if head else None
        return answer

    def caps(self, skus: Iterable[str]) -> dict[str, Cap]:
        """Return the caps the held snapshot sets for those SKUs (absent: no cap). Raises StorageError."""
        wanted = sorted(set(skus))

        def read(conn: sqlite3.Connection):
            if self._schema == "1" or not wanted:
                return []
            if len(wanted) == 1:
                return conn.execute("SELECT sku, cap FROM availability_items WHERE sku = ? AND cap IS NOT NULL",
                                    wanted).fetchall()
            return conn.execute("SELECT sku, cap FROM availability_items WHERE cap IS NOT NULL AND sku IN"
                                " (SELECT value FROM json_each(?))", (msgspec.json.encode(wanted),)).fetchall()

        rows = self._read("caps", read) or []
        try:
            return {sku: _cap_of(raw) for sku, raw in rows}
        except (msgspec.DecodeError, TypeError) as exc:
            raise StorageError(f"storage: a cap in {self.path.name} does not decode: {exc}") from None

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


class HeldCaps:
    """The log writer's `caps_for`: the caps sync.db holds, read at decide time, never failing.

    Own read-only connection, opened on the writer thread at its first call, with no busy
    wait. When sync.db cannot be read (missing, locked, corrupt, an unknown schema) the
    caps this process last read for those SKUs apply, and a SKU never read is uncapped.
    A cap is a commercial limit on top of the store's stock rules, kept as data derived
    from the hub's snapshot: a broken derived file must not stop the tills selling (a sale
    is a fact the store records whatever happens), so the failure is logged, once per
    distinct reason, and selling goes on under the caps last known.
    """

    def __init__(self, path: str | Path):
        self._view = SqliteSyncView(path, busy_timeout_ms=0)
        self._last: dict[str, Cap] = {}
        self._failing: str | None = None
        self.failures = 0

    def __call__(self, skus: set[str]) -> dict[str, Cap]:
        try:
            found = self._view.caps(skus)
        except Exception as exc:  # see the class docstring: a read never fails a write
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self._failing:
                log.warning("caps: cannot read %s (%s); the caps last read apply", self._view.path, reason)
                self._failing = reason
            self._view.close()   # open afresh next time: the file may have been replaced
            return {sku: self._last[sku] for sku in skus if sku in self._last}
        if self._failing is not None:
            log.info("caps: %s is readable again", self._view.path)
            self._failing = None
        for sku in skus:
            if sku in found:
                self._last[sku] = found[sku]
            else:
                self._last.pop(sku, None)
        return found

    def close(self) -> None:
        self._view.close()
