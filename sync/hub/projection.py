"""The hub's availability tables: each store's stock projection and publish state.

Source feeds and orders live in sync/hub/feeds.py, caps in sync/hub/captables.py.

Every function takes a sqlite3 connection inside the caller's transaction (the hub
store's ingest transaction for `apply_events`, `HubStore.run` for the others), so the
projection moves in the same commit as the events that move it.

The projection sums each event's effect (`agent.inventory.effect`, which depends on the
event alone), so it does not care about arrival order: events that arrive after a gap
count at once, and each stored event is applied exactly once because the hook only sees
the events stored by that transaction (duplicates and conflicts are not).

An ingest transaction records its summed changes as one `hub_stock_pending` row per store;
every `PENDING_ROWS` rows (and before each snapshot computation) they are added into
`hub_stock` and deleted in one transaction, so a SKU's row is rewritten once per fold rather
than once per ingest transaction. Readers use `stock` / `available_by_store`, which add
what is still pending.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Iterable, Literal, Union

import msgspec

from agent.events import CURRENT_SCHEMA, EventDecodeError, decode_event
from agent.inventory import effect
from common.sqlite import insert_rows
from sync.hub.availability import Published
from sync.protocol import EventHead

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
    # Stock changes committed with their events but not yet added into hub_stock: one row
    # per store per ingest transaction (msgpack [[sku, floor, backroom, reserved], ...]).
    """CREATE TABLE IF NOT EXISTS hub_stock_pending (
        id       INTEGER PRIMARY KEY,
        store_id TEXT NOT NULL,
        deltas   BLOB NOT NULL
    )""",
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
        apply_bodies(conn, store_id, bodies)
        folded += len(bodies)
    conn.execute("INSERT INTO hub_meta(key, value) VALUES ('projection', 'v1')")
    return folded


# ----------------------------------------------------------------- stock facts
#
# The projection needs only a few fields of each event (type, schema, sku, qty, location,
# from/to, variance, delta). These narrow Structs read just those (msgspec skips the rest)
# and give the same delta as `agent.inventory.effect(decode_event(body))` for every event
# of the current schema (tests/sync/test_projection.py checks it for every type), at about
# a third of the cost. Anything else (an older schema that needs upcasting, an unknown
# type, a stock field that does not fit) goes through the full `decode_event`, which
# upcasts or refuses it as before. Fields the projection does not use are not checked.
#
# They extend the hub's EventHead, so the hub decodes each batch's heads as `EVENT_VIEW`
# (`protocol.decode_batch(payload, EVENT_VIEW)`) and the ingest hook folds those heads
# without reading the bodies again.

NARROW_SCHEMA = CURRENT_SCHEMA  # the event layout the Structs below mirror
_Location = Literal["floor", "backroom"]


class _Fact(EventHead, frozen=True, gc=False, kw_only=True, tag_field="type"):
    schema: int = CURRENT_SCHEMA
    sku: str


class _Received(_Fact, tag="received"):
    qty: int
    location: _Location = "backroom"

    def delta(self) -> tuple[int, int, int]:
        return _at(self.location, self.qty)


class _Returned(_Received, tag="returned"):
    pass


class _Sold(_Fact, tag="sold"):
    qty: int
    recorded_at: str  # the cap usage hook's day bucket (sync/hub/captables.py)
    location: _Location = "floor"

    def delta(self) -> tuple[int, int, int]:
        return _at(self.location, -self.qty)


class _Moved(_Fact, tag="moved"):
    qty: int
    from_: _Location = msgspec.field(name="from")
    to: _Location

    def delta(self) -> tuple[int, int, int]:
        out, into = _at(self.from_, -self.qty), _at(self.to, self.qty)
        return out[0] + into[0], out[1] + into[1], 0


class _Counted(_Fact, tag="counted"):
    location: _Location
    variance: int

    def delta(self) -> tuple[int, int, int]:
        return _at(self.location, self.variance)


class _Adjusted(_Fact, tag="adjusted"):
    location: _Location
    delta_: int = msgspec.field(name="delta")

    def delta(self) -> tuple[int, int, int]:
        return _at(self.location, self.delta_)


class _Reserved(_Fact, tag="reserved"):
    qty: int
    recorded_at: str
    reservation_id: str

    def delta(self) -> tuple[int, int, int]:
        return 0, 0, self.qty


class _Released(_Fact, tag="reservation_released"):
    qty: int
    recorded_at: str
    reservation_id: str

    def delta(self) -> tuple[int, int, int]:
        return 0, 0, -self.qty


class _Fulfilled(_Fact, tag="reservation_fulfilled"):
    qty: int
    location: _Location = "floor"

    def delta(self) -> tuple[int, int, int]:
        floor, backroom, _ = _at(self.location, -self.qty)
        return floor, backroom, -self.qty


def _at(location: str, qty: int) -> tuple[int, int, int]:
    return (qty, 0, 0) if location == "floor" else (0, qty, 0)


_Facts = Union[_Received, _Returned, _Sold, _Moved, _Counted, _Adjusted, _Reserved, _Released, _Fulfilled]
EVENT_VIEW = _Facts  # the view the hub decodes event heads as (sync/hub/service.py)
_fact_decoder = msgspec.json.Decoder(_Facts)
_facts_decoder = msgspec.json.Decoder(list[_Facts])


def stock_delta(body: bytes) -> tuple[str, int, int, int]:
    """Return (sku, floor, backroom, reserved): the event's effect on its SKU's stock.

    Raises EventDecodeError (or TypeError) when the event cannot be read, as `decode_event` does.
    """
    try:
        fact = _fact_decoder.decode(body)
    except msgspec.DecodeError:
        fact = None  # not JSON, or a field or type the narrow view does not know: the full decoder says
    if fact is not None and fact.schema == NARROW_SCHEMA:
        return (fact.sku, *fact.delta())
    eff = effect(decode_event(body))
    return eff.sku, eff.floor, eff.backroom, eff.reserved


PENDING_ROWS = 32  # fold hub_stock_pending into hub_stock once it holds this many rows

_Deltas = dict[str, tuple[int, int, int]]
_pending_encoder = msgspec.msgpack.Encoder()
_pending_decoder = msgspec.msgpack.Decoder(list[tuple[str, int, int, int]])


def pending_deltas(store_id: str, events: Iterable[tuple[object, bytes]]) -> bytes | None:
    """The ingest hook (sync/hub/storage.py): the summed stock changes of newly stored events
    as one `hub_stock_pending.deltas` blob (msgpack), or None when they change no stock.

    Pure: the storage inserts the row in its ingest transaction (SQLite or PostgreSQL).
    Events are read as in `apply_events`.
    """
    deltas = _fold(store_id, events)
    return _pending_encoder.encode([(sku, *d) for sku, d in deltas.items()]) if deltas else None


def apply_events(conn: sqlite3.Connection, store_id: str, events: Iterable[tuple[object, bytes]]) -> None:
    """Add the effect of newly stored events to the store's projection (SQLite, in the caller's transaction).

    `events`: (head, raw body) pairs as the hub stored them. A head decoded as
    `EVENT_VIEW` of the current schema is folded as it is; any other event is read from
    its body. An event the hub cannot read (a schema newer than this hub knows) is logged
    and left out of the projection; it is still stored and acked.

    The group's summed changes are recorded as one `hub_stock_pending` row, and every
    `PENDING_ROWS` rows are added into `hub_stock` at once (`fold_pending`): a SKU's row is
    written once per fold instead of once per ingest transaction. `stock` reads both.
    """
    blob = pending_deltas(store_id, events)
    if blob is not None:
        conn.execute("INSERT INTO hub_stock_pending(store_id, deltas) VALUES (?, ?)", (store_id, blob))
        if conn.execute("SELECT COUNT(*) FROM hub_stock_pending").fetchone()[0] >= PENDING_ROWS:
            fold_pending(conn)


def apply_bodies(conn: sqlite3.Connection, store_id: str, bodies: Iterable[bytes]) -> None:
    """Add the effect of stored event bodies straight into `hub_stock` (the first build)."""
    bodies = list(bodies)
    # The whole list in one decoder call when every event fits the narrow view (the usual
    # case); one event at a time, with the full decoder's fallback, for those that do not.
    try:
        facts = _facts_decoder.decode(b"[" + b",".join(bodies) + b"]")
    except msgspec.DecodeError:
        facts = [None] * len(bodies)
    _add_to_stock(conn, {store_id: _fold(store_id, zip(facts, bodies))})


def _fold(store_id: str, events: Iterable[tuple[object, bytes]]) -> _Deltas:
    deltas: _Deltas = {}
    get = deltas.get
    for head, body in events:
        if isinstance(head, _Fact) and head.schema == NARROW_SCHEMA:
            sku, delta = head.sku, head.delta()
        else:
            try:
                sku, *delta = stock_delta(body)
            except (EventDecodeError, TypeError) as exc:
                log.error("hub: projection skips an event of %s it cannot read: %s", store_id, exc)
                continue
        held = get(sku)
        deltas[sku] = delta if held is None else (held[0] + delta[0], held[1] + delta[1], held[2] + delta[2])
    return deltas


def _pending(conn: sqlite3.Connection) -> tuple[dict[str, _Deltas], int]:
    """Return the pending changes summed per store and SKU, and the highest pending row id (0: none)."""
    out: dict[str, _Deltas] = {}
    last = 0
    for row_id, store_id, blob in conn.execute("SELECT id, store_id, deltas FROM hub_stock_pending ORDER BY id"):
        deltas = out.setdefault(store_id, {})
        get = deltas.get
        for sku, floor, backroom, reserved in _pending_decoder.decode(blob):
            held = get(sku)
            deltas[sku] = ((floor, backroom, reserved) if held is None
                           else (held[0] + floor, held[1] + backroom, held[2] + reserved))
        last = row_id
    return out, last


def fold_pending(conn: sqlite3.Connection) -> int:
    """Add every pending change into `hub_stock` and clear them; return the rows folded."""
    pending, last = _pending(conn)
    if last:
        _add_to_stock(conn, pending)
        conn.execute("DELETE FROM hub_stock_pending WHERE id <= ?", (last,))
    return sum(map(len, pending.values()))


def _add_to_stock(conn: sqlite3.Connection, deltas: dict[str, _Deltas]) -> None:
    # In key order: the upserts walk hub_stock's B-tree once instead of jumping around it.
    insert_rows(conn, "INSERT INTO hub_stock(store_id, sku, floor, backroom, reserved)",
                sorted((store_id, sku, *d) for store_id, by_sku in deltas.items() for sku, d in by_sku.items()),
                " ON CONFLICT(store_id, sku) DO UPDATE SET floor = floor + excluded.floor,"
                " backroom = backroom + excluded.backroom, reserved = reserved + excluded.reserved")


def stock(conn: sqlite3.Connection) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Return store_id -> sku -> (floor, backroom, reserved): `hub_stock` plus the pending changes.

    Call inside one read transaction for a consistent view.
    """
    out: dict[str, dict[str, tuple[int, int, int]]] = {}
    for store_id, sku, floor, backroom, reserved in conn.execute(
            "SELECT store_id, sku, floor, backroom, reserved FROM hub_stock"):
        out.setdefault(store_id, {})[sku] = (floor, backroom, reserved)
    pending, _ = _pending(conn)
    for store_id, deltas in pending.items():
        held = out.setdefault(store_id, {})
        for sku, (floor, backroom, reserved) in deltas.items():
            f, b, r = held.get(sku, (0, 0, 0))
            held[sku] = (f + floor, b + backroom, r + reserved)
    return out


def available_by_store(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Return store_id -> sku -> available (the contract's max(0, floor + backroom - reserved)).

    Call inside one read transaction for a consistent view.
    """
    if conn.execute("SELECT 1 FROM hub_stock_pending LIMIT 1").fetchone() is not None:
        return {store_id: {sku: max(0, f + b - r) for sku, (f, b, r) in by_sku.items()}
                for store_id, by_sku in stock(conn).items()}
    out: dict[str, dict[str, int]] = {}
    for store_id, sku, available in conn.execute(
            "SELECT store_id, sku, MAX(0, floor + backroom - reserved) FROM hub_stock"):
        out.setdefault(store_id, {})[sku] = available
    return out


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
