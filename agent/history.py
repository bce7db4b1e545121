"""Appending the store's own history back from the hub (rehydrate), on the log's writer.

The hub's events for seqs after the log's end are appended as they are: the same event
ids, seqs and bodies (byte for byte), the projections updated in the same transaction,
exactly as if the agent had decided them. Before anything is written the history is
checked: the seqs continue the log's last seq gapless, every event is this store's and
decodes, and the chain continues the log's own hash at its last seq (when the hub sent
its hashes, each must equal the one computed here). A history that fails any check is
refused whole (`HistoryRefused`), nothing appended.

Commands known only from the history get a marker body hash (`HISTORY_BODY_HASH`): their
request bodies never reached this box, so a retry of one is answered as a duplicate with
its seqs (agent/logstore.py `_repeat`), never appended again.

The log's `incarnation` (meta key) is here too: 1 for a new log, bumped by
`edge-agent restore` and `edge-agent rehydrate` (docs/protocol.md, "Store incarnation").
"""

from __future__ import annotations

import sqlite3
from typing import Iterable

from agent import events as ev
from agent.inventory import Inventory, Reservation, Stock, effect, evolve
from agent.schema import mark_time
from common import chain
from common.sqlite import insert_rows


# (seq, body, hub's chain hash at seq or None)
HistoryRow = tuple[int, bytes, bytes | None]


class HistoryRefused(Exception):
    """The hub's history does not continue this log; nothing was appended."""


def incarnation_of(conn: sqlite3.Connection) -> int:
    """The log's incarnation (1 when the meta key is absent: a log from before it)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
    except sqlite3.OperationalError:
        return 1
    return int(row[0]) if row else 1


def set_incarnation(conn: sqlite3.Connection, value: int) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES ('incarnation', ?)"
                 " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(value),))


def append_history(conn: sqlite3.Connection, store_id: str, tail: tuple[int, bytes, int],
                   rows: Iterable[HistoryRow]) -> tuple[tuple[int, bytes, int], list[ev.AnyEvent]]:
    """Check and append `rows` after `tail` (inside the caller's transaction); return (tail, events).

    Raises HistoryRefused naming the first seq that does not fit.
    """
    last_seq, last_hash, cp_seq = tail
    events: list[ev.AnyEvent] = []
    staged: list[tuple[ev.AnyEvent, bytes, bytes]] = []
    for seq, body, hub_hash in rows:
        body = bytes(body)
        if seq != last_seq + 1:
            raise HistoryRefused(f"history: seq {seq} does not continue the log at {last_seq}")
        try:
            event = ev.decode_event(body)
        except ev.EventDecodeError as exc:
            raise HistoryRefused(f"history: seq {seq} is not an event: {exc}") from None
        if event.seq != seq or event.store_id != store_id:
            raise HistoryRefused(f"history: seq {seq} holds event seq {event.seq} of store {event.store_id!r}")
        computed = chain.link(last_hash, body)
        if hub_hash is not None and bytes(hub_hash) != computed:
            raise HistoryRefused(
                f"history: the hub's event at seq {seq} does not chain to this log's hash at seq {seq - 1}"
                f" ({last_hash.hex()[:16]}...): the hub holds another history than this log")
        staged.append((event, body, computed))
        events.append(event)
        last_seq, last_hash = seq, computed
    if not staged:
        return tail, []
    _store(conn, store_id, tail[0], staged)
    return (last_seq, last_hash, cp_seq), events


def _store(conn: sqlite3.Connection, store_id: str, prev_last: int,
           staged: list[tuple[ev.AnyEvent, bytes, bytes]]) -> None:
    from agent.logstore import HISTORY_BODY_HASH, _EVENT_INSERT, usage_rows, write_projection   # the writer's own SQL

    skus = {effect(e).sku for e, _, _ in staged}
    rids = {r for e, _, _ in staged if (r := getattr(e, "reservation_id", None)) is not None}
    state = Inventory(store_id, prev_last)
    for rid, sku, qty, status, opened, closed, opened_at, expires_at in conn.execute(
            "SELECT reservation_id, sku, qty, status, opened_seq, closed_seq, opened_at, expires_at"
            " FROM reservations WHERE reservation_id IN (SELECT value FROM json_each(?))",
            (ev.encode(sorted(rids)),)):
        state.reservations[rid] = Reservation(rid, sku, qty, status, opened, closed, opened_at, expires_at)
    for sku, floor, backroom, reserved, seq in conn.execute(
            "SELECT sku, floor, backroom, reserved, last_seq FROM stock WHERE sku IN (SELECT value FROM json_each(?))",
            (ev.encode(sorted(skus)),)):
        state.stock[sku] = Stock(floor, backroom, reserved, seq)
    # Usage before evolving: a release's usage counts in its reservation's slot (as at append).
    known = {rid: Reservation(**vars(r)) for rid, r in state.reservations.items()}
    rows, commands = [], {}
    for event, body, h in staged:
        eff = effect(event)
        rid = getattr(event, "reservation_id", None)
        if isinstance(event, ev.Reserved):
            known[event.reservation_id] = Reservation(event.reservation_id, event.sku, event.qty, "open",
                                                      event.seq, None, event.recorded_at)
        evolve(state, event)
        rows.append((event.seq, event.event_id, event.command_id, ev.type_of(event), event.schema, eff.sku, rid,
                     eff.floor, eff.backroom, eff.reserved, bytearray(body), h))
        first, _, at = commands.get(event.command_id, (event.seq, event.seq, event.recorded_at))
        commands[event.command_id] = (first, event.seq, at)
    insert_rows(conn, _EVENT_INSERT, rows)
    conn.executemany(
        "INSERT INTO commands(command_id, body_hash, first_seq, last_seq, recorded_at) VALUES (?,?,?,?,?)"
        " ON CONFLICT(command_id) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
        [(cid, HISTORY_BODY_HASH, first, last, at) for cid, (first, last, at) in commands.items()])
    write_projection(conn, state, skus, rids)
    usage = usage_rows([e for e, _, _ in staged], known)
    if usage:
        conn.executemany(
            "INSERT INTO cap_usage(sku, slot, qty) VALUES (?,?,?)"
            " ON CONFLICT(sku, slot) DO UPDATE SET qty = qty + excluded.qty", usage)
    for _, (first, _, at) in sorted(commands.items(), key=lambda kv: kv[1][0]):
        mark_time(conn, at, first)
