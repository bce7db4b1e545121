"""The agent <-> hub wire format: topic names and message Structs. Pure: no I/O.

Every payload is a UTF-8 JSON object with `"v": 1` (see docs/protocol.md). Topic helpers
take the configured prefix `P` (default `retail`). Decoders raise `ProtocolError` naming
what did not fit, on any input: never msgspec's errors, nor RecursionError for JSON
nested deeper than msgspec can decode.

An event batch is built by joining the events' canonical bodies as stored in the log, so
the agent never re-encodes an event on the way out (`encode_batch`), and the hub reads
only the envelope fields it needs from each event (`decode_batch`), keeping the raw body.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import Annotated, Any, Literal, Union, get_args

import msgspec

from agent.events import STORE_ID_PATTERN, AnyEvent
from common import jsoncheck

VERSION = 1
_STORE_ID = re.compile(STORE_ID_PATTERN)

StoreId = Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
Seq = Annotated[int, msgspec.Meta(ge=1)]
SeqOrZero = Annotated[int, msgspec.Meta(ge=0)]
# A hash-chain value on the wire (common/chain.py): sha256, 64 lowercase hex digits.
ChainHash = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class ProtocolError(ValueError):
    """A payload or topic that does not follow the wire contract."""

    reason = "undecodable"


class StoreMismatch(ProtocolError):
    """An event in a batch names another store than the batch."""

    reason = "store_mismatch"


class DuplicateKey(ProtocolError):
    """A JSON object in the payload has a key twice (decoders keep one value, the raw body both)."""

    reason = "duplicate_key"


# ---------------------------------------------------------------------------- topics


def events_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/events`: agent -> hub, QoS 1, not retained."""
    return f"{prefix}/stores/{store_id}/events"


def ack_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/ack`: hub -> agent, QoS 1, retained."""
    return f"{prefix}/stores/{store_id}/ack"


def availability_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/availability`: hub -> agent, QoS 1, retained."""
    return f"{prefix}/stores/{store_id}/availability"


def status_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/status`: the agent's retained online/offline state (also its will)."""
    return f"{prefix}/stores/{store_id}/status"


def warehouse_stock_topic(prefix: str, warehouse_id: str) -> str:
    """`P/warehouses/{warehouse_id}/stock`: warehouse feed -> hub, QoS 1, retained."""
    return f"{prefix}/warehouses/{warehouse_id}/stock"


def catalog_topic(prefix: str) -> str:
    """`P/catalog`: hub -> agents, QoS 1, retained."""
    return f"{prefix}/catalog"


def all_events_filter(prefix: str) -> str:
    """The hub's subscription to every store's events: `P/stores/+/events`."""
    return f"{prefix}/stores/+/events"


def all_status_filter(prefix: str) -> str:
    return f"{prefix}/stores/+/status"


def warehouses_filter(prefix: str) -> str:
    return f"{prefix}/warehouses/+/stock"


def store_of(prefix: str, topic: str, kind: str) -> str | None:
    """Return the store id in `P/stores/{id}/{kind}`, or None when the topic is not one."""
    lead = f"{prefix}/stores/"
    tail = f"/{kind}"
    if not (topic.startswith(lead) and topic.endswith(tail)):
        return None
    store_id = topic[len(lead):len(topic) - len(tail)]
    return store_id if _STORE_ID.match(store_id) else None


# -------------------------------------------------------------------------- messages


class EventHead(msgspec.Struct, frozen=True, gc=False):
    """The envelope fields of a synced event the hub needs; other fields are ignored.

    `store_id` is not pattern-checked here: `decode_batch` requires it to equal the
    batch's (which is), and names an invalid one when it does not.
    """

    seq: Seq
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    store_id: str


class EventBatch(msgspec.Struct, frozen=True, gc=False):
    """`P/stores/{id}/events`: consecutive events first_seq..last_seq in seq order.

    `prev_hash` (the store's chain hash at first_seq - 1, all zeros for first_seq 1) and
    `hash` (at last_seq) come together or not at all: an agent from before the chain was
    anchored sends neither, and the hub takes such a batch as unanchored.
    """

    v: Literal[1]
    store_id: StoreId
    first_seq: Seq
    last_seq: Seq
    events: list[msgspec.Raw]
    prev_hash: ChainHash | None = None
    hash: ChainHash | None = None
    # The log's incarnation (docs/protocol.md, "Store incarnation"): bumped by a restore or
    # a rehydrate; absent from agents before it. Written after the hashes, before `events`.
    incarnation: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Ack(msgspec.Struct, frozen=True):
    """`P/stores/{id}/ack`: the hub durably holds every event 1..acked_seq of the store.

    `epoch` (the hub record's identity, new when the record is restored) and `rev` (per
    store, one up with every committed change of acked_seq within the epoch) are optional
    and come together: they let the agent tell an ack that crossed a newer one in flight
    (same epoch, lower rev: ignored) from a restored hub (another epoch: a lower ack
    rewinds). An older hub sends neither and an older agent ignores them.
    """

    store_id: StoreId
    acked_seq: SeqOrZero
    v: Literal[1] = VERSION
    epoch: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    rev: SeqOrZero | None = None


class Status(msgspec.Struct, frozen=True):
    """`P/stores/{id}/status`: retained; the will publishes state "offline".

    `accept` lists the MQTT 5 content types the agent can read besides plain JSON
    (`ZLIB_JSON`); the hub compresses a store's snapshots only when it is listed.
    """

    store_id: StoreId
    state: Literal["online", "offline"]
    v: Literal[1] = VERSION
    at: str | None = None
    client_id: str | None = None
    accept: list[str] = []


# MQTT 5 content type of a zlib-compressed (RFC 1950) JSON payload (docs/availability.md).
# A message without it (and every message under MQTT 3.1.1) is plain JSON.
ZLIB_JSON = "application/json+zlib"


class NearbyStore(msgspec.Struct, frozen=True):
    store_id: StoreId
    available: int


class AvailabilityItem(msgspec.Struct, frozen=True):
    sku: str
    nearby: list[NearbyStore]
    online: int | None = None


class Availability(msgspec.Struct, frozen=True):
    """`P/stores/{id}/availability`: retained; `version` grows monotonically.

    `sources`: the configured sources' table (SnapshotSource), absent from hubs before it.
    """

    store_id: StoreId
    version: SeqOrZero
    generated_at: str
    items: list[AvailabilityItem]
    v: Literal[1] = VERSION
    sources: list[SnapshotSource] | None = None


class WarehouseItem(msgspec.Struct, frozen=True):
    sku: str
    available: int


class WarehouseStock(msgspec.Struct, frozen=True):
    """`P/warehouses/{id}/stock`: online availability from a warehouse feed."""

    warehouse_id: str
    version: SeqOrZero
    items: list[WarehouseItem]
    v: Literal[1] = VERSION


class CatalogItem(msgspec.Struct, frozen=True):
    sku: str
    name: str


class Catalog(msgspec.Struct, frozen=True):
    """`P/catalog`: product names for kiosks."""

    version: SeqOrZero
    items: list[CatalogItem]
    v: Literal[1] = VERSION


# ---------------------------------------------------------------------------- codecs

_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.json.Decoder(EventBatch)
_head_decoder = msgspec.json.Decoder(EventHead)
_decoders: dict[type, msgspec.json.Decoder] = {}


def encode(message: msgspec.Struct) -> bytes:
    """Encode any message Struct as compact UTF-8 JSON."""
    return _encoder.encode(message)


def decode(payload: bytes, cls: type[msgspec.Struct]):
    """Decode `payload` as `cls`; raises ProtocolError (with msgspec's reason) when it does not fit."""
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{cls.__name__}: JSON nested too deep to decode") from None
    except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
        raise ProtocolError(f"{cls.__name__}: not UTF-8 at byte {exc.start}") from None


def encode_batch(store_id: str, first_seq: int, last_seq: int, bodies: list[bytes],
                 prev_hash: bytes | None = None, last_hash: bytes | None = None,
                 incarnation: int | None = None) -> bytes:
    """Build an events payload around already-encoded event bodies (no re-encoding)."""
    return encode_joined_batch(store_id, first_seq, last_seq, b",".join(bodies), prev_hash, last_hash,
                               incarnation)


def encode_joined_batch(store_id: str, first_seq: int, last_seq: int, joined: bytes,
                        prev_hash: bytes | None = None, last_hash: bytes | None = None,
                        incarnation: int | None = None) -> bytes:
    """Build an events payload around event bodies already joined by commas.

    `prev_hash` (the chain hash at first_seq - 1) and `last_hash` (at last_seq), raw 32-byte
    hashes, both or neither, go on the wire as hex fields `prev_hash` and `hash`;
    `incarnation` (the log's, None: left out) after them.
    """
    head = _batch_head(store_id, first_seq, last_seq, prev_hash, last_hash, incarnation)
    return b"".join((head, b"[", joined, b"]}"))


def _batch_head(store_id: str, first_seq: int, last_seq: int, prev_hash, last_hash,
                incarnation: int | None = None) -> bytes:
    """The agent's encoding of a batch up to its events list (the hashes before it, so the
    events list ends the payload and `_canonical` can compare it whole)."""
    head = b'{"v":1,"store_id":"%s","first_seq":%d,"last_seq":%d,' % (store_id.encode(), first_seq, last_seq)
    if prev_hash is not None or last_hash is not None:
        head += b'"prev_hash":"%s","hash":"%s",' % (_hex(prev_hash), _hex(last_hash))
    if incarnation is not None:
        head += b'"incarnation":%d,' % incarnation
    return head + b'"events":'


def _hex(value) -> bytes:
    return (value.hex() if isinstance(value, (bytes, bytearray)) else str(value)).encode()


_heads_decoders: dict[object, msgspec.json.Decoder] = {}
_seq_of = attrgetter("seq")
_store_of = attrgetter("store_id")


def _heads_decoder(view) -> msgspec.json.Decoder:
    decoder = _heads_decoders.get(view)
    if decoder is None:
        members = getattr(view, "__args__", (view,))
        if not all(isinstance(m, type) and issubclass(m, EventHead) for m in members):
            raise TypeError(f"decode_batch: the view {view!r} must be EventHead or (a union of) its subclasses")
        heads = msgspec.defstruct("BatchHeads", [("events", list[view])], frozen=True, gc=False)
        decoder = _heads_decoders[view] = msgspec.json.Decoder(heads)
    return decoder


def decode_batch(payload: bytes, view=EventHead) -> tuple[EventBatch, list[tuple[EventHead, bytes]]]:
    """Decode an events payload and the head of each event; return (batch, [(head, raw body)]).

    Raises ProtocolError when the payload is not a v1 batch (JSON nested too deep
    included), when it has only one of prev_hash and hash, when its events are not
    exactly first_seq..last_seq in order,
    StoreMismatch when an event's store_id differs from the batch's, and DuplicateKey
    when any object in the payload has a key twice. The raw bodies (bytes-like msgspec.Raw) are returned as
    sent, for the hub to store unchanged.

    `view`: what each head is decoded as, EventHead or a subclass (or a tagged union of
    subclasses) that also reads other fields, so a consumer of the events needs no second
    decode. When an event does not fit the view, every head of the batch is an EventHead
    instead: the view never refuses what EventHead accepts.
    """
    try:
        batch = _batch_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"events payload: {exc}") from None
    except RecursionError:
        raise ProtocolError("events payload: JSON nested too deep to decode") from None
    except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
        raise ProtocolError(f"events payload: not UTF-8 at byte {exc.start}") from None
    try:
        heads = _heads_decoder(view).decode(payload).events
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        if view is EventHead:
            raise ProtocolError(f"events payload: {exc}") from None
        return decode_batch(payload)
    except RecursionError:
        raise ProtocolError("events payload: JSON nested too deep to decode") from None
    except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
        raise ProtocolError(f"events payload: not UTF-8 at byte {exc.start}") from None
    first, last = batch.first_seq, batch.last_seq
    if (batch.prev_hash is None) != (batch.hash is None):
        raise ProtocolError("events payload: prev_hash and hash come together or not at all")
    if last < first:
        raise ProtocolError(f"events payload: last_seq {last} < first_seq {first}")
    if len(heads) != last - first + 1:
        raise ProtocolError(f"events payload: {len(heads)} events for seqs {first}..{last}")
    # map/attrgetter keep the per-event checks out of the interpreter loop (the hub's hot path).
    if list(map(_seq_of, heads)) != list(range(first, last + 1)):
        raise ProtocolError(f"events payload: the events are not seqs {first}..{last} in order")
    store_id = batch.store_id
    if set(map(_store_of, heads)) != {store_id}:
        for head in heads:
            if head.store_id != store_id:
                if not _STORE_ID.match(head.store_id):
                    raise ProtocolError(f"events payload: event seq {head.seq} has an invalid store_id"
                                        f" {head.store_id!r}")
                raise StoreMismatch(f"events payload: event seq {head.seq} is for store {head.store_id!r},"
                                    f" the batch for {store_id!r}")
    if not _canonical(payload, batch):
        try:
            where = jsoncheck.duplicate_key(payload)
        except ValueError as exc:  # msgspec read it as JSON; json may still refuse (nesting)
            raise ProtocolError(f"events payload: {exc}") from None
        if where is not None:
            raise DuplicateKey(f"events payload: key {where} appears twice")
    return batch, list(zip(heads, batch.events))


def _canonical_events_decoder() -> msgspec.json.Decoder:
    # Every current event type with all its fields required, in the agent's encoding order.
    members = tuple(
        msgspec.defstruct(f"Canonical{cls.__name__}", [(f.encode_name, Any) for f in msgspec.structs.fields(cls)],
                          tag=cls.__struct_config__.tag, tag_field="type", forbid_unknown_fields=True,
                          frozen=True, gc=False)
        for cls in get_args(AnyEvent))
    events = msgspec.defstruct("CanonicalEvents", [("events", list[Union[members]])], frozen=True, gc=False)
    return msgspec.json.Decoder(events)


_canonical_decoder = _canonical_events_decoder()


def _canonical(payload: bytes, batch: EventBatch) -> bool:
    """True when `payload` is exactly the agent's encoding of a batch of current-schema events.

    Re-encoding decoded objects writes each key once, so a payload byte-equal to that
    re-encoding has no duplicated key: the agent's batches need no second look (one more
    decode, not a parse into dicts). Anything else (another encoder's spacing or key
    order, an older schema) gets the exact check instead.
    """
    head = _batch_head(batch.store_id, batch.first_seq, batch.last_seq, batch.prev_hash, batch.hash,
                       batch.incarnation)
    if not (payload.startswith(head) and payload.endswith(b"}")):
        return False
    try:
        events = _canonical_decoder.decode(payload).events
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return False
    return payload[len(head):-1] == _encoder.encode(events)


# ------------------------------------------------- sources, caps, orders (issue 15)
#
# New wire structs of the hub's feeds and the snapshot item's optional additions. Old
# agents ignore the added item fields; UNSET fields are left out of the JSON entirely, so
# an item without sources or cap costs no bytes.


def source_stock_topic(prefix: str, source_id: str) -> str:
    """`P/sources/{source_id}/stock`: partner/supplier/warehouse feed -> hub, QoS 1, retained."""
    return f"{prefix}/sources/{source_id}/stock"


def sources_filter(prefix: str) -> str:
    return f"{prefix}/sources/+/stock"


def caps_topic(prefix: str, sku: str) -> str:
    """`P/caps/{sku}`: a SKU's sales cap -> hub, QoS 1, retained (empty payload: no cap)."""
    return f"{prefix}/caps/{sku}"


def caps_filter(prefix: str) -> str:
    return f"{prefix}/caps/+"


def orders_topic(prefix: str, source_id: str) -> str:
    """`P/orders/{source_id}`: open orders claiming a source's stock -> hub, QoS 1, not retained."""
    return f"{prefix}/orders/{source_id}"


def orders_filter(prefix: str) -> str:
    return f"{prefix}/orders/+"


ONLINE = "online"  # the orders topic level that claims against the sum of warehouse sources


class SourceStock(msgspec.Struct, frozen=True):
    """`P/sources/{id}/stock`: a configured source's whole list; a newer `version` replaces it."""

    source_id: str
    version: SeqOrZero
    items: list[WarehouseItem]
    v: Literal[1] = VERSION


class CapMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """`P/caps/{sku}`: limit per calendar period, per store (each, or `store_id` only) or chain-wide."""

    sku: str
    limit: int
    period: str
    scope: str = "store"
    store_id: str | None = None
    v: int = VERSION


class Order(msgspec.Struct, frozen=True):
    order_id: str
    sku: str
    qty: int
    state: str


class OrdersMessage(msgspec.Struct, frozen=True):
    """`P/orders/{source_id}`: orders by id; the latest state of an order replaces the earlier."""

    orders: list[Order]
    v: int = VERSION


class SnapshotSource(msgspec.Struct, frozen=True, gc=False):
    """One configured source in a snapshot's `sources` table: its metadata, once per snapshot.

    The items carry only each source's quantity (`StoreItem.sources`), so a new list from
    a source moves `updated_at` here, in one entry, not in every item it lists.
    """

    source_id: str
    name: str
    kind: str
    lead_time_s: int
    updated_at: str
    stale: bool
    stale_after_s: int


class CapAllowance(msgspec.Struct, frozen=True, gc=False):
    """A snapshot item's cap: the cap as set, the store's current period and its allowance."""

    limit: int
    scope: str
    period: str
    period_start: str
    period_end: str
    allowance: int


class StoreItem(AvailabilityItem, frozen=True):
    """A snapshot item with the optional `sources` and `cap` (left out when UNSET)."""

    # source_id -> available (net of open orders), in config order; each source_id is in
    # the snapshot's `sources` table. msgspec.Raw: the hub encodes it once per region.
    sources: dict[str, int] | msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    cap: CapAllowance | msgspec.UnsetType = msgspec.UNSET


# ------------------------------------------------ incarnation and rehydrate (issue 17)
#
# A store whose log holds less of its history than the hub (restored from an older
# backup, or a new box) asks the hub for the missing events and appends them as they
# are before it writes again (docs/protocol.md, "Rehydrate").


def rehydrate_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/rehydrate`: agent -> hub, QoS 1, not retained."""
    return f"{prefix}/stores/{store_id}/rehydrate"


def history_topic(prefix: str, store_id: str) -> str:
    """`P/stores/{store_id}/history`: hub -> agent, QoS 1, not retained."""
    return f"{prefix}/stores/{store_id}/history"


def all_rehydrate_filter(prefix: str) -> str:
    return f"{prefix}/stores/+/rehydrate"


# The hub answers one request with at most HISTORY_MAX_CHUNKS chunks of HISTORY_CHUNK_EVENTS.
HISTORY_CHUNK_EVENTS = 200
HISTORY_MAX_CHUNKS = 25

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class RehydrateRequest(msgspec.Struct, frozen=True):
    """`P/stores/{id}/rehydrate`: send me the events after `after_seq`, up to your ack."""

    store_id: StoreId
    after_seq: SeqOrZero
    request_id: RequestId
    incarnation: Annotated[int, msgspec.Meta(ge=1)] | None = None
    v: Literal[1] = VERSION


class HistoryBatch(msgspec.Struct, frozen=True, gc=False):
    """`P/stores/{id}/history`: an EventBatch of the hub's held events, with its chain
    hashes as the hub holds them (both or neither), the request it answers and the hub's ack.

    `first_seq`/`last_seq`/`events` may be empty (0, 0, []) when the hub holds nothing
    after the request's `after_seq`.
    """

    v: Literal[1]
    store_id: StoreId
    first_seq: SeqOrZero
    last_seq: SeqOrZero
    events: list[msgspec.Raw]
    request_id: RequestId
    hub_acked_seq: SeqOrZero
    prev_hash: ChainHash | None = None
    hash: ChainHash | None = None
