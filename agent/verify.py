"""Check a log end to end (`verify`) and rebuild its projections from the events (`rebuild`).

verify reads on two connections at once, each in one read transaction so each sees
one consistent state even while the service writes:
  on this thread, walking the events once in Python:
  1. seqs run 1..N with no gap;
  2. the hash chain holds: hash(n) = sha256(hash(n-1) + body(n));
  3. each body decodes, carries its row's seq and the log's store id, and the effect
     columns beside it equal the effect computed from the body; each count's variance
     equals the on-hand it replaced;
  on a second thread, in SQL (SQLite releases the GIL, so this uses the other core):
  4. the stored projections (stock, reservations with their lease times, cap usage, the
     latest checkpoint) equal a replay
     of the events in that connection's snapshot;
  5. `PRAGMA integrity_check` is ok.
"""

from __future__ import annotations

import hashlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from agent import events as ev
from common.errors import storage_error
from agent.reader import open_readonly
from agent.schema import FILL_CAP_USAGE, GENESIS, REPLAY_CAP_USAGE, fill_time_marks, take_checkpoint
from common.sqlite import in_write_transaction

MAX_LISTED = 20


@dataclass
class Report:
    """The outcome of verify: `ok` when `problems` is empty."""

    events: int = 0
    last_seq: int = 0
    skus: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)
        elif len(self.problems) == MAX_LISTED:
            self.problems.append("... more problems not listed")

    def render(self) -> str:
        head = f"events: {self.events}, last seq: {self.last_seq}, skus: {self.skus}"
        if self.ok:
            return f"{head}\nverify: OK (gapless, hash chain intact, integrity ok, projections equal replay)"
        return head + "\nverify: FAILED\n" + "\n".join(f"  - {p}" for p in self.problems)


class _Effects(msgspec.Struct):
    """The fields `verify` reads from a body; decoding only these is cheaper than the full event."""

    type: str
    seq: int
    store_id: str
    schema: int = 1
    sku: str = ""
    qty: int = 0
    location: str = ""
    from_: str = msgspec.field(name="from", default="")
    to: str = ""
    counted: int = 0
    variance: int = 0
    delta: int = 0
    reservation_id: str | None = None


_effects_decoder = msgspec.json.Decoder(_Effects)


def verify_log(path: str | Path, progress: Callable[[int], None] | None = None) -> Report:
    """Verify the log at `path` (read-only); return a Report. Raises StorageError if unreadable."""
    conn = open_readonly(path)
    # The SQL checks are C work that releases the GIL: run them on a second connection on
    # the other core while this thread walks the hash chain in Python.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-sql") as pool:
        sql_checks = pool.submit(_sql_checks, path)
        try:
            conn.execute("BEGIN")
            report = Report()
            store_id = (conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone() or [""])[0]
            _check_chain(conn, store_id, report, progress)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise storage_error("verify", exc) from exc
        finally:
            conn.close()
        skus, problems = sql_checks.result()
        report.skus = skus
        for problem in problems:
            report.add(problem)
    return report


def _sql_checks(path: str | Path) -> tuple[int, list[str]]:
    """Projections against a replay, then integrity_check; returns (skus, problems)."""
    conn = open_readonly(path)
    try:
        problems: list[str] = []
        conn.execute("BEGIN")
        skus = _check_projections(conn, problems)
        conn.execute("COMMIT")
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            problems.append("integrity_check: " + "; ".join(rows[:5]))
        return skus, problems
    except sqlite3.Error as exc:
        return 0, [f"SQL checks could not run: {exc}"]
    finally:
        conn.close()


def _expected(e: _Effects) -> tuple[str, int, int, int]:
    if e.type in ("received", "returned"):
        df, db, dr = (e.qty, 0, 0) if e.location == "floor" else (0, e.qty, 0)
    elif e.type == "sold":
        df, db, dr = (-e.qty, 0, 0) if e.location == "floor" else (0, -e.qty, 0)
    elif e.type == "moved":
        df = (e.qty if e.to == "floor" else 0) - (e.qty if e.from_ == "floor" else 0)
        db = (e.qty if e.to == "backroom" else 0) - (e.qty if e.from_ == "backroom" else 0)
        dr = 0
    elif e.type in ("counted", "adjusted"):
        amount = e.variance if e.type == "counted" else e.delta
        df, db, dr = (amount, 0, 0) if e.location == "floor" else (0, amount, 0)
    elif e.type == "reserved":
        df, db, dr = 0, 0, e.qty
    elif e.type == "reservation_released":
        df, db, dr = 0, 0, -e.qty
    elif e.type == "reservation_fulfilled":
        df, db, dr = (-e.qty, 0, -e.qty) if e.location == "floor" else (0, -e.qty, -e.qty)
    else:
        raise ValueError(f"unknown event type {e.type!r}")
    return e.sku, df, db, dr


def _check_chain(conn: sqlite3.Connection, store_id: str, report: Report,
                 progress: Callable[[int], None] | None) -> None:
    prev, count, first, last = GENESIS, 0, None, 0
    on_hand: dict[tuple[str, str], int] = {}
    sha = hashlib.sha256
    cursor = conn.execute(
        "SELECT seq, type, schema, sku, d_floor, d_backroom, d_reserved, body, hash FROM events ORDER BY seq")
    while rows := cursor.fetchmany(10_000):
        for seq, etype, schema, sku, d_floor, d_backroom, d_reserved, body, stored in rows:
            digest = sha(prev + body).digest()
            if digest != stored:
                report.add(f"hash chain broken at seq {seq}: the body or an earlier event was altered")
            prev = stored
            try:
                fields = _effects_decoder.decode(body) if schema == ev.CURRENT_SCHEMA else _upcast(body)
                want = _expected(fields)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                report.add(f"seq {seq}: body does not decode: {exc}")
                continue
            if fields.seq != seq or fields.type != etype or fields.store_id != store_id:
                report.add(f"seq {seq}: body says seq {fields.seq}, type {fields.type}, store {fields.store_id}")
            if want != (sku, d_floor, d_backroom, d_reserved):
                report.add(f"seq {seq}: stored effect {(sku, d_floor, d_backroom, d_reserved)} != body's {want}")
            if etype == "counted":
                before = on_hand.get((sku, fields.location), 0)
                if fields.counted - before != fields.variance:
                    report.add(f"seq {seq}: count variance {fields.variance} but on-hand before was {before}")
            if d_floor:
                on_hand[(sku, "floor")] = on_hand.get((sku, "floor"), 0) + d_floor
            if d_backroom:
                on_hand[(sku, "backroom")] = on_hand.get((sku, "backroom"), 0) + d_backroom
        count += len(rows)
        first = rows[0][0] if first is None else first
        last = rows[-1][0]
        if progress:
            progress(len(rows))
    # seq is the primary key (unique, ascending here), so 1..count is the only gapless range.
    report.events, report.last_seq = count, last
    if count and (first != 1 or last != count):
        report.add(f"seqs are not gapless: {count} events span {first}..{last}")


def _upcast(body: bytes) -> _Effects:
    return msgspec.convert(msgspec.to_builtins(ev.decode_event(body)), _Effects)


_REPLAY_STOCK = """
    SELECT sku, SUM(d_floor), SUM(d_backroom), SUM(d_reserved), MAX(seq) FROM events GROUP BY sku
"""
_REPLAY_RESERVATIONS = """
    SELECT o.rid, o.sku, o.d_reserved,
           CASE c.type WHEN 'reservation_released' THEN 'released'
                       WHEN 'reservation_fulfilled' THEN 'fulfilled' ELSE 'open' END,
           o.seq, c.seq, json_extract(CAST(o.body AS TEXT), '$.recorded_at'),
           json_extract(CAST(o.body AS TEXT), '$.expires_at')
      FROM events o LEFT JOIN events c ON c.rid = o.rid AND c.type != 'reserved'
     WHERE o.type = 'reserved'
"""


def _check_projections(conn: sqlite3.Connection, problems: list[str]) -> int:
    """Compare the stored projections with a replay in SQL; return the number of SKUs."""
    for label, replay, stored in (
        ("stock", _REPLAY_STOCK, "SELECT sku, floor, backroom, reserved, last_seq FROM stock"),
        ("reservations", _REPLAY_RESERVATIONS,
         "SELECT reservation_id, sku, qty, status, opened_seq, closed_seq, opened_at, expires_at FROM reservations"),
        ("cap_usage", f"SELECT sku, slot, qty FROM ({REPLAY_CAP_USAGE}) WHERE qty != 0",
         "SELECT sku, slot, qty FROM cap_usage WHERE qty != 0"),
    ):
        extra = conn.execute(f"{stored} EXCEPT {replay}").fetchmany(5)
        missing = conn.execute(f"{replay} EXCEPT {stored}").fetchmany(5)
        for row in extra:
            problems.append(f"{label}: stored row {tuple(row)} is not what the events give")
        for row in missing:
            problems.append(f"{label}: replay gives {tuple(row)} but the stored projection differs or lacks it")
    last_cp = conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0]
    if last_cp:
        wrong = conn.execute(
            "SELECT c.sku, c.floor, c.backroom, c.reserved, r.f, r.b, r.r FROM stock_checkpoints c"
            " JOIN (SELECT sku, SUM(d_floor) f, SUM(d_backroom) b, SUM(d_reserved) r FROM events"
            "       WHERE seq <= ? GROUP BY sku) r ON r.sku = c.sku"
            " WHERE c.seq = ? AND (c.floor, c.backroom, c.reserved) != (r.f, r.b, r.r) LIMIT 5",
            (last_cp, last_cp)).fetchall()
        for row in wrong:
            problems.append(f"checkpoint at seq {last_cp}: {row[0]} stored {row[1:4]} but events give {row[4:7]}")
    return conn.execute("SELECT COUNT(*) FROM stock").fetchone()[0]


def rebuild_projections(conn: sqlite3.Connection, chunk: int,
                        progress: Callable[[int], None] | None = None) -> int:
    """Rebuild stock, reservations and checkpoints from the events, in SQL; return events read.

    Runs inside one transaction on the caller's (writer) connection: either the old
    projections or the complete new ones are visible, never a half-built state.
    """
    return in_write_transaction(conn, _rebuild, chunk, progress)


def _rebuild(conn: sqlite3.Connection, chunk: int, progress: Callable[[int], None] | None) -> int:
    for table in ("stock", "reservations", "stock_checkpoints", "checkpoints", "cap_usage", "time_marks"):
        conn.execute(f"DELETE FROM {table}")
    last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    taken_at = conn.execute("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')").fetchone()[0]
    done = 0
    while done < last:
        upto = min(done + chunk, last)
        conn.execute(
            "INSERT INTO stock(sku, floor, backroom, reserved, last_seq)"
            " SELECT sku, SUM(d_floor), SUM(d_backroom), SUM(d_reserved), MAX(seq) FROM events"
            " WHERE seq > ? AND seq <= ? GROUP BY sku"
            " ON CONFLICT(sku) DO UPDATE SET floor = floor + excluded.floor,"
            " backroom = backroom + excluded.backroom, reserved = reserved + excluded.reserved,"
            " last_seq = excluded.last_seq", (done, upto))
        if upto - done == chunk:
            take_checkpoint(conn, done, upto, taken_at)
        if progress:
            progress(upto - done)
        done = upto
    conn.execute("INSERT INTO reservations(reservation_id, sku, qty, status, opened_seq, closed_seq, opened_at,"
                 " expires_at) " + _REPLAY_RESERVATIONS)
    conn.execute(FILL_CAP_USAGE)
    fill_time_marks(conn)
    return last
