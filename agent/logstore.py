"""The SQL of the log's writer: opening the database, and deciding and storing appends.

Everything here runs on the log's writer thread, on its one sqlite3 connection, inside
the transaction agent/log.py opens around it; agent/log.py owns the thread, the queue
and the answers to callers. sqlite3 errors raised here are mapped by the caller.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from agent import events as ev
from agent.caps import Cap, cap_window, usage_change
from agent.inventory import Inventory, Refused, Reservation, Stock, decide_and_apply, skus_touched
from agent.schema import GENESIS, LEASE_INDEX_SQL, SCHEMA_SQL, apply_pragmas, mark_time, migrate, take_checkpoint
from common.sqlite import in_write_transaction
from common.errors import StorageError
from common.sqlite import insert_rows

# (last seq, last hash, projection checkpoint seq): where the log ends.
Tail = tuple[int, bytes, int]

# Returns the caps held for those SKUs (absent: no cap known). Never raises: see
# agent.syncview.HeldCaps, the writer's implementation.
CapsFor = Callable[[set[str]], dict[str, Cap]]

# The body hash of a command known only from the hub's history (agent/history.py): no
# sha256 of a command body is this, so a retry of it is answered as a duplicate.
HISTORY_BODY_HASH = b"\x00" * 31 + b"\x01"



def no_caps(skus: set[str]) -> dict[str, Cap]:
    """The CapsFor of a log without a sync view (tools, tests): no cap is known."""
    return {}


@dataclass(frozen=True)
class AppendResult:
    """What an append answered: the seqs, and whether the command had been seen before."""

    command_id: str
    first_seq: int
    last_seq: int
    duplicate: bool
    events: tuple[ev.AnyEvent, ...] = ()


class Pending(Protocol):
    """An append waiting in a batch: the command and the hash of its body."""

    command: ev.AppendCommand
    body_hash: bytes


class SeenBefore(Exception):
    """A command taken for new is already in `commands` (its transaction must roll back)."""


def command_hash(command: ev.AppendCommand) -> bytes:
    """Hash a command's canonical body; the same request body always hashes the same."""
    return hashlib.sha256(ev.encode(command)).digest()


def init_db(conn: sqlite3.Connection, store_id: str, synchronous: str) -> Tail:
    """Set the pragmas, create the tables, claim the file for `store_id`; return the tail.

    Raises StorageError when the file belongs to another store, ValueError for an
    unknown `synchronous`.
    """
    apply_pragmas(conn, synchronous)
    conn.executescript(SCHEMA_SQL)
    in_write_transaction(conn, migrate)
    conn.executescript(LEASE_INDEX_SQL)
    row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?)", (store_id,))
    elif row[0] != store_id:
        raise StorageError(f"storage: this log belongs to store {row[0]!r}, not {store_id!r}")
    # The log's incarnation (agent/history.py): 1 for a new log or one from before it.
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('incarnation', '1')")
    row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    cp = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM checkpoints").fetchone()[0]
    return (row[0], row[1], cp) if row else (0, GENESIS, cp)


def decide_and_store(conn: sqlite3.Connection, store_id: str, tail: Tail, batch: list[Pending], now: str,
                     new_id: Callable[[], str], checkpoint_every: int, lookup: bool,
                     caps_for: CapsFor = no_caps):
    """Decide and store a batch inside the caller's transaction; return (results, appended, tail).

    `results` holds, per job, an AppendResult or a Refused. With `lookup` false, commands
    are not looked up first: raises SeenBefore (and the caller rolls back) when one turns
    out to be stored already, and a refused command is looked up before its refusal is
    answered (a retry may be refused now).
    """
    last_seq, last_hash, cp_seq = tail
    known = _known(conn, [job.command.command_id for job in batch]) if lookup else {}
    refused: list[int] = []
    state = _load_state(conn, store_id, last_seq, [job.command for job in batch], now, caps_for)
    results: list = []
    rows: list[tuple] = []
    command_rows: list[tuple] = []
    appended: list[ev.AnyEvent] = []
    skus: set[str] = set()
    rids: set[str] = set()
    for job in batch:
        cid = job.command.command_id
        seen = known.get(cid)
        if seen is not None:
            results.append(_repeat(cid, seen, job.body_hash))
            continue
        try:
            decided = decide_and_apply(state, job.command, now, new_id)
        except Refused as refusal:
            refused.append(len(results))
            results.append(refusal)
            continue
        last_hash = _stage(decided, cid, last_hash, rows, skus, rids)
        new_events = [event for event, _ in decided]
        first, last = new_events[0].seq, new_events[-1].seq
        known[cid] = (cid, job.body_hash, first, last)
        command_rows.append((cid, job.body_hash, first, last, now))
        appended.extend(new_events)
        results.append(AppendResult(cid, first, last, False, tuple(new_events)))
    if refused and not lookup:
        _answer_refused_retries(conn, batch, refused, results)
    if rows:
        _store(conn, rows, command_rows, state, skus, rids, usage_rows(appended, state.reservations))
        mark_time(conn, now, rows[0][0])
    if state.last_seq - cp_seq >= checkpoint_every:
        take_checkpoint(conn, cp_seq, state.last_seq, now)
        cp_seq = state.last_seq
    return results, appended, (state.last_seq, last_hash, cp_seq)


def checkpoint_projection(conn: sqlite3.Connection, tail: Tail, taken_at: str) -> int:
    """Take a projection checkpoint at the tail's seq unless there is one; return its seq."""
    last_seq, _, prev = tail
    if last_seq > prev:
        take_checkpoint(conn, prev, last_seq, taken_at)
    return last_seq


def _stage(decided: list, cid: str, last_hash: bytes, rows: list[tuple], skus: set[str],
           rids: set[str]) -> bytes:
    """Add one command's event rows to `rows` (chaining hashes); return the last hash."""
    encode, sha256, type_of = ev.encode, hashlib.sha256, ev.type_of
    for event, eff in decided:
        body = encode(event)
        last_hash = sha256(last_hash + body).digest()
        rid = getattr(event, "reservation_id", None)
        if rid is not None:
            rids.add(rid)
        skus.add(eff.sku)
        rows.append((event.seq, event.event_id, cid, type_of(event), event.schema, eff.sku, rid,
                     eff.floor, eff.backroom, eff.reserved, body, last_hash))
    return last_hash


def _repeat(cid: str, seen: tuple, body_hash: bytes) -> AppendResult | Refused:
    # A command known only from the hub's history (agent/history.py) has no body to compare.
    if seen[1] != body_hash and seen[1] != HISTORY_BODY_HASH:
        return Refused("command_conflict",
                       f"command_id {cid!r} was already used with a different body", "command_id")
    return AppendResult(cid, seen[2], seen[3], True)


def _answer_refused_retries(conn: sqlite3.Connection, batch: list[Pending], refused: list[int],
                            results: list) -> None:
    """Replace the refusal of each refused command seen before with its repeat answer."""
    seen = _known(conn, [batch[i].command.command_id for i in refused])
    for i in refused:
        cid = batch[i].command.command_id
        if cid in seen:
            results[i] = _repeat(cid, seen[cid], batch[i].body_hash)


def _known(conn: sqlite3.Connection, command_ids: list[str]) -> dict[str, tuple]:
    """Return the stored (command_id, body_hash, first_seq, last_seq) of those command ids."""
    return {row[0]: row for row in _select_in(
        conn, "SELECT command_id, body_hash, first_seq, last_seq FROM commands", "command_id", command_ids)}


def _select_in(conn: sqlite3.Connection, select: str, column: str, values: list[str]) -> sqlite3.Cursor:
    """Run `select` for the rows whose `column` is one of `values` (a one-value list is `=`)."""
    if len(values) == 1:
        return conn.execute(f"{select} WHERE {column} = ?", values)
    return conn.execute(f"{select} WHERE {column} IN (SELECT value FROM json_each(?))", (ev.encode(values),))


_CAPPED_INTENTS = (ev.Sell, ev.Reserve)


def _load_state(conn: sqlite3.Connection, store_id: str, last_seq: int,
                commands: list[ev.AppendCommand], now: str, caps_for: CapsFor) -> Inventory:
    skus: set[str] = set()
    rids: set[str] = set()
    for command in commands:
        s, r = skus_touched(command)
        skus |= s
        rids |= r
    state = Inventory(store_id, last_seq)
    counted = {i.sku for command in commands for i in command.events if isinstance(i, _CAPPED_INTENTS)}
    if counted:
        _load_caps(conn, state, counted, now, caps_for)
    if rids:
        for rid, sku, qty, status, opened, closed, opened_at, expires_at in _select_in(
                conn, "SELECT reservation_id, sku, qty, status, opened_seq, closed_seq, opened_at, expires_at"
                      " FROM reservations", "reservation_id", sorted(rids)):
            state.reservations[rid] = Reservation(rid, sku, qty, status, opened, closed, opened_at, expires_at)
            skus.add(sku)
    if skus:
        for sku, floor, backroom, reserved, seq in _select_in(
                conn, "SELECT sku, floor, backroom, reserved, last_seq FROM stock", "sku", sorted(skus)):
            state.stock[sku] = Stock(floor, backroom, reserved, seq)
    return state


def _load_caps(conn: sqlite3.Connection, state: Inventory, skus: set[str], now: str, caps_for: CapsFor) -> None:
    """Put the caps of `skus` and their usage in the period containing `now` into `state`."""
    state.caps = caps_for(skus)
    for sku, cap in state.caps.items():
        window = cap_window(cap, now)
        state.usage[sku] = dict(conn.execute(
            "SELECT slot, qty FROM cap_usage WHERE sku = ? AND slot >= ? AND slot < ?",
            (sku, window.first_slot, window.end_slot)).fetchall())


def usage_rows(events: Iterable[ev.AnyEvent], reservations: dict[str, Reservation]) -> list[tuple[str, int, int]]:
    """Return the (sku, slot, delta) cap-usage changes of appended events, summed per slot."""
    sums: dict[tuple[str, int], int] = {}
    for event in events:
        reservation = reservations.get(getattr(event, "reservation_id", None) or "")
        change = usage_change(event, reservation.opened_at if reservation is not None else None)
        if change is not None:
            key = change[:2]
            sums[key] = sums.get(key, 0) + change[2]
    return [(sku, slot, delta) for (sku, slot), delta in sums.items() if delta]


_EVENT_INSERT = ("INSERT INTO events(seq, event_id, command_id, type, schema, sku, rid, d_floor, d_backroom,"
                 " d_reserved, body, hash)")


def _store(conn: sqlite3.Connection, rows: list[tuple], command_rows: list[tuple],
           state: Inventory, skus: set[str], rids: set[str], usage: list[tuple[str, int, int]]) -> None:
    insert_rows(conn, _EVENT_INSERT, rows)
    # executemany for the WITHOUT ROWID tables: a multi-row VALUES insert into them
    # measured slower (64 random command ids: 545 us against 149 us).
    try:
        conn.executemany(
            "INSERT INTO commands(command_id, body_hash, first_seq, last_seq, recorded_at) VALUES (?,?,?,?,?)",
            command_rows)
    except sqlite3.IntegrityError as exc:  # the key is all these rows can break: a command stored before
        raise SeenBefore from exc
    write_projection(conn, state, skus, rids)
    if usage:
        conn.executemany(
            "INSERT INTO cap_usage(sku, slot, qty) VALUES (?,?,?)"
            " ON CONFLICT(sku, slot) DO UPDATE SET qty = qty + excluded.qty", usage)


def write_projection(conn: sqlite3.Connection, state, skus, rids) -> None:
    """Upsert the stock rows of `skus` and the reservation rows of `rids` from `state`
    (inside the caller's append transaction)."""
    conn.executemany(
        "INSERT INTO stock(sku, floor, backroom, reserved, last_seq) VALUES (?,?,?,?,?)"
        " ON CONFLICT(sku) DO UPDATE SET floor = excluded.floor, backroom = excluded.backroom,"
        " reserved = excluded.reserved, last_seq = excluded.last_seq",
        [(sku, s.floor, s.backroom, s.reserved, s.last_seq) for sku in skus for s in (state.stock[sku],)])
    if rids:
        conn.executemany(
            "INSERT INTO reservations(reservation_id, sku, qty, status, opened_seq, closed_seq, opened_at,"
            " expires_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(reservation_id) DO UPDATE SET"
            " status = excluded.status, closed_seq = excluded.closed_seq",
            [(r.reservation_id, r.sku, r.qty, r.status, r.opened_seq, r.closed_seq, r.opened_at, r.expires_at)
             for rid in rids if (r := state.reservations.get(rid)) is not None])
