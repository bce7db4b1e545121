"""The hub's availability tables: each store's stock projection and publish state.

Source feeds and orders live in sync/hub/feeds.py, caps in sync/hub/captables.py.

Every function takes a connection inside the caller's transaction (the hub store's
ingest transaction for `apply_events`, `HubStore.run` for the others), so the
projection moves in the same commit as the events that move it: a sqlite3 connection, or
on PostgreSQL a `sync.hub.sqlcompat.PgConn` (the same SQL, portable; `PG_SCHEMA` is the
PostgreSQL DDL).

The projection sums each event's effect (`agent.inventory.effect`, which depends on the
event alone), so it does not care about arrival order: events that arrive after a gap
count at once, and each stored event is applied exactly once because the hook only sees
the events stored by that transaction (duplicates and conflicts are not).

An ingest transaction records its summed changes as one `hub_stock_pending` row per store
(`pending_deltas`, a pure function of the events, so any storage engine can insert it);
every `PENDING_ROWS` rows on SQLite, and before each snapshot computation (by the leader
only, on PostgreSQL: sync/hub/leader.py) they are added into `hub_stock` and deleted in
one transaction
(`DELETE ... RETURNING`: a row that commits while the fold runs is left for the next
one, never lost), so a SKU's row is rewritten once per fold rather than once per ingest
transaction. Readers use `stock` / `available_by_store`, which add what is still pending.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Iterable, Literal, Union

import msgspec

from agent.events import CURRENT_SCHEMA, EventDecodeError, decode_event
from agent.inventory import effect
from common.sqlite import insert_rows
from sync.hub import sqlcompat
from sync.hub.availability import Published
from sync.hub.migrations import Migration
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


# The same tables on PostgreSQL (versions and milliseconds past 2^31: BIGINT), as migrations
# (sync/hub/migrations.py; hub_meta and hub_stock_pending are the core storage's migration 1).
PG_SCHEMA = [sqlcompat.pg_ddl(s, bigint=("version", "generated_at_ms", "floor", "backroom", "reserved"))
             for s in SCHEMA if "hub_meta" not in s and "hub_stock_pending" not in s]
POSTGRES_MIGRATIONS = [Migration(100, "hub_stock, availability_published", PG_SCHEMA)]

SETUP_LOCK = 0x6564_6765_0001  # advisory lock: one worker sets the availability tables up at a time


def create_tables(conn, schema: list[str]) -> None:
    """SQLite: create a module's tables. PostgreSQL: its migrations did (`POSTGRES_MIGRATIONS`);
    take SETUP_LOCK, so one worker at a time makes a first build."""
    if sqlcompat.is_pg(conn):
        sqlcompat.xact_lock(conn, SETUP_LOCK)
        return
    for statement in schema:
        conn.execute(statement)


def setup(conn: sqlite3.Connection) -> int:
    """Create the tables; build the projection from every held event the first time.

    Returns the number of events folded by that first build (0 afterwards).
    """
    create_tables(conn, SCHEMA)
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


PENDING_ROWS = 32  # fold hub_stock_pending into hub_stock once it holds this many rows (SQLite)

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
    _add_to_stock(conn, {store_id: _fold(store_id, _facts_of(list(bodies)))})


def _facts_of(bodies: list[bytes]) -> Iterable[tuple[object, bytes]]:
    # The whole list in one decoder call when every event fits the narrow view (the usual
    # case); one event at a time, with the full decoder's fallback, for those that do not.
    bodies = [bytes(b) for b in bodies]
    try:
        facts = _facts_decoder.decode(b"[" + b",".join(bodies) + b"]")
    except msgspec.DecodeError:
        facts = [None] * len(bodies)
    return zip(facts, bodies)


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


def _sum_stock(rows: Iterable[tuple[str, bytes]]) -> dict[str, _Deltas]:
    out: dict[str, _Deltas] = {}
    for store_id, blob in rows:
        deltas = out.setdefault(store_id, {})
        get = deltas.get
        for sku, floor, backroom, reserved in _pending_decoder.decode(blob):
            held = get(sku)
            deltas[sku] = ((floor, backroom, reserved) if held is None
                           else (held[0] + floor, held[1] + backroom, held[2] + reserved))
    return out


def _pending(conn: sqlite3.Connection) -> dict[str, _Deltas]:
    """Return the pending stock changes summed per store and SKU."""
    return _sum_stock(conn.execute("SELECT store_id, deltas FROM hub_stock_pending ORDER BY id"))


def fold_pending(conn: sqlite3.Connection) -> int:
    """Add every pending change into `hub_stock` and clear them; return the rows folded.

    One `DELETE ... RETURNING`: exactly the rows it deletes are added, so a row another
    transaction commits meanwhile (PostgreSQL, READ COMMITTED) stays for the next fold, and
    two folds at once (a deposed leader's and the new one's) never add a row twice.
    """
    rows = conn.execute("DELETE FROM hub_stock_pending RETURNING store_id, deltas").fetchall()
    if not rows:
        return 0
    pending = _sum_stock(rows)
    _add_to_stock(conn, pending)
    return sum(map(len, pending.values()))


def _add_to_stock(conn: sqlite3.Connection, deltas: dict[str, _Deltas]) -> None:
    # In key order: the upserts walk hub_stock's B-tree once instead of jumping around it
    # (and on PostgreSQL two folds lock rows in one order).
    insert_rows(conn, "INSERT INTO hub_stock(store_id, sku, floor, backroom, reserved)",
                sorted((store_id, sku, *d) for store_id, by_sku in deltas.items() for sku, d in by_sku.items()),
                " ON CONFLICT(store_id, sku) DO UPDATE SET floor = hub_stock.floor + excluded.floor,"
                " backroom = hub_stock.backroom + excluded.backroom,"
                " reserved = hub_stock.reserved + excluded.reserved")


def stock(conn: sqlite3.Connection) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Return store_id -> sku -> (floor, backroom, reserved): `hub_stock` plus the pending changes.

    Call inside one read transaction for a consistent view.
    """
    out: dict[str, dict[str, tuple[int, int, int]]] = {}
    for store_id, sku, floor, backroom, reserved in conn.execute(
            "SELECT store_id, sku, floor, backroom, reserved FROM hub_stock"):
        out.setdefault(store_id, {})[sku] = (floor, backroom, reserved)
    for store_id, deltas in _pending(conn).items():
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
            "SELECT store_id, sku, CASE WHEN floor + backroom - reserved > 0"
            " THEN floor + backroom - reserved ELSE 0 END FROM hub_stock"):
        out.setdefault(store_id, {})[sku] = available
    return out


def rebuild_store(conn, store_id: str, from_seq: int = 1, apply_usage=None) -> dict:
    """Recompute a store's projection rows from its held events (`edge-hub replay`); return a summary.

    Every SKU that the store's events from `from_seq` on touch gets its `hub_stock` row
    (and, with `apply_usage(conn, store_id, events)`, its cap use rows in `cap_sold` and
    `cap_reserved`) recomputed from all of the store's held events of that SKU: the
    projection is a sum, so a row is rebuilt whole rather than from a middle point.
    `from_seq` 1 rebuilds every row of the store.

    Run inside one write transaction. Pending rows are folded first; on PostgreSQL the
    pending table is locked (EXCLUSIVE: ingest transactions wait at their pending row, a
    fold waits) so that the events read and the rows written agree.
    """
    if sqlcompat.is_pg(conn):
        conn.execute("LOCK TABLE hub_stock_pending IN EXCLUSIVE MODE")
    fold_pending(conn)
    touched: set[str] = set()
    deltas: _Deltas = {}
    replayed = read = after = 0
    chunks: list[list[tuple[object, bytes]]] = []
    while True:
        rows = conn.execute("SELECT seq, body FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT 5000",
                            (store_id, after)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        read += len(rows)
        events = list(_facts_of([body for _, body in rows]))
        for (seq, _), one in zip(rows, events):
            if seq >= from_seq:
                replayed += 1
                touched.update(_fold(store_id, [one]))
        for sku, d in _fold(store_id, events).items():
            held = deltas.get(sku, (0, 0, 0))
            deltas[sku] = (held[0] + d[0], held[1] + d[1], held[2] + d[2])
        if apply_usage is not None:
            chunks.append(events)
    if from_seq <= 1:
        touched.update(sku for (sku,) in conn.execute("SELECT sku FROM hub_stock WHERE store_id = ?", (store_id,)))
    skus = sorted(touched)
    before = {sku: (f, b, r) for sku, f, b, r in conn.execute(
        "SELECT sku, floor, backroom, reserved FROM hub_stock WHERE store_id = ?", (store_id,)) if sku in touched}
    rebuilt = {sku: deltas[sku] for sku in skus if sku in deltas}
    keys = [(store_id, sku) for sku in skus]
    conn.executemany("DELETE FROM hub_stock WHERE store_id = ? AND sku = ?", keys)
    _add_to_stock(conn, {store_id: rebuilt})
    if apply_usage is not None:
        conn.executemany("DELETE FROM cap_sold WHERE store_id = ? AND sku = ?", keys)
        conn.executemany("DELETE FROM cap_reserved WHERE store_id = ? AND sku = ?", keys)
        for events in chunks:
            apply_usage(conn, store_id, [e for e in events if _sku_of(e) in touched])
    changed = sorted(sku for sku in skus if before.get(sku) != rebuilt.get(sku))
    return {"store_id": store_id, "from_seq": from_seq, "events_read": read, "events_replayed": replayed,
            "skus": len(skus), "rows_changed": len(changed), "changed": changed[:100]}


def _sku_of(event: tuple[object, bytes]) -> str | None:
    head, body = event
    if isinstance(head, _Fact):
        return head.sku
    try:
        return stock_delta(body)[0]
    except (EventDecodeError, TypeError):
        return None


def published(conn: sqlite3.Connection) -> dict[str, Published]:
    """Return what was last published per store."""
    return {store_id: Published(version, bytes(digest), at) for store_id, version, digest, at in conn.execute(
        "SELECT store_id, version, digest, generated_at_ms FROM availability_published")}


class Fenced(ValueError):
    """A snapshot version write refused: not above the held one, or this worker is no longer the leader."""


def record_published(conn: sqlite3.Connection, store_id: str, version: int, digest: bytes,
                     generated_at_ms: int, fence: tuple[str, tuple] = ("1 = 1", ())) -> None:
    """Persist a store's published snapshot before it goes out; raise Fenced when refused.

    The write is guarded: it changes the row only where the held version is lower
    (`... WHERE availability_published.version < excluded.version`) and `fence` (an SQL
    condition and its parameters, `Leader.fence()`: on PostgreSQL that the advisory lock is
    still held by this worker's leader connection) holds. A refused write changes
    nothing and its snapshot must not be published.
    """
    condition, args = fence
    cur = conn.execute(
        "INSERT INTO availability_published(store_id, version, digest, generated_at_ms)"
        f" SELECT ?, ?, ?, ? WHERE {condition}"
        " ON CONFLICT(store_id) DO UPDATE SET version = excluded.version,"
        " digest = excluded.digest, generated_at_ms = excluded.generated_at_ms"
        " WHERE availability_published.version < excluded.version",
        (store_id, version, digest, generated_at_ms, *args))
    if cur.rowcount != 1:
        held = conn.execute("SELECT version FROM availability_published WHERE store_id = ?", (store_id,)).fetchone()
        raise Fenced(f"availability: version {version} for {store_id} refused (held: {held[0] if held else None},"
                     f" or this worker no longer leads)")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM hub_meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO hub_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (key, value))
