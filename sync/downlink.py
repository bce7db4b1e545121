"""Hub -> store: apply availability snapshots and the catalog from their retained topics.

Runs in `edge-agent sync`. Subscribes to `P/stores/{store_id}/availability` and
`P/catalog`. The MQTT adapter acknowledges a message only after the handler returns, so
a snapshot is acked after it committed to sync.db (sync/state.py); a retained snapshot
published while the store was offline arrives again on (re)connect and is applied then if
it is newer. The agent reads sync.db read-only (agent/syncview.py): kiosk reads keep
being answered from the previous snapshot until the new one commits, and a 100,000-SKU
payload is decoded in this process, never in the one that answers the kiosks.

Bad input (not JSON, wrong shape, another store's id, a SKU or count that breaks the
contract) is logged, counted (`dropped_<reason>` in sync.db's counters, exposed by the
agent as `edge_agent_downlink_dropped_total{reason}`) and acknowledged: redelivering it
would not make it valid. The held snapshot stays.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import re
import time
import zlib
from typing import Annotated, Literal

import msgspec

from common import clock
from common.errors import StorageError
from agent.events import SKU_PATTERN, STORE_ID_PATTERN, TIME_PATTERN, valid_time
from sync.ports import Row, SyncState
from sync import protocol

log = logging.getLogger("edge_sync.downlink")

CHUNK_ITEMS = 1000
ZLIB_JSON = protocol.ZLIB_JSON
MAX_INFLATED = 512 * 1024 * 1024   # a compressed payload may not inflate past this

_Sku = Annotated[str, msgspec.Meta(pattern=SKU_PATTERN)]
_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Nearby(msgspec.Struct, frozen=True, gc=False):
    store_id: str          # checked per distinct value (a few per snapshot), see _check_ids
    available: _Count


_Time = Annotated[str, msgspec.Meta(pattern=TIME_PATTERN)]   # and a real date-time: see _check_times


_SourceId = Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]


class _Source(msgspec.Struct, frozen=True, gc=False):
    """One entry of the snapshot's `sources` table (unknown members are ignored: newer hubs may add some)."""

    source_id: _SourceId
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    kind: Literal["warehouse", "partner", "supplier"]
    lead_time_s: _Count
    updated_at: _Time
    stale: bool
    stale_after_s: _Count


class _Cap(msgspec.Struct, frozen=True, gc=False):
    """The SKU's sales cap for this store (docs/availability.md)."""

    limit: _Count
    scope: Literal["store", "chain"]
    period: Literal["day", "week", "month"]
    period_start: _Time
    period_end: _Time
    allowance: _Count


class _Item(msgspec.Struct, frozen=True, gc=False):
    sku: str               # checked a chunk at a time, see _check_ids
    nearby: list[_Nearby]
    online: _Count | None = None
    # source_id -> available. The keys are checked against the table (whose ids are checked
    # by pattern) in rows_from: a pattern on the keys here would cost 0.3 s per 100,000 items.
    sources: dict[str, _Count] | None = None
    cap: _Cap | None = None


class _SnapshotHead(msgspec.Struct, frozen=True):
    v: Literal[1]
    store_id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
    version: _Count
    generated_at: Annotated[str, msgspec.Meta(pattern=TIME_PATTERN)]
    items: list[msgspec.Raw]   # each item's JSON, decoded and checked later in chunks
    sources: list[_Source] | None = None   # absent from hubs before the table


class _CatalogItem(msgspec.Struct, frozen=True, gc=False):
    sku: _Sku
    name: Annotated[str, msgspec.Meta(max_length=512)]


class _Catalog(msgspec.Struct, frozen=True):
    v: Literal[1]
    version: _Count
    items: list[_CatalogItem]


class _Decoder:
    """A msgspec JSON decoder that raises msgspec.DecodeError, not RecursionError, for JSON nested too deep."""

    def __init__(self, type_):
        self._decoder = msgspec.json.Decoder(type_)

    def decode(self, payload):
        try:
            return self._decoder.decode(payload)
        except RecursionError:
            raise msgspec.DecodeError("JSON nested too deep to decode") from None
        except UnicodeDecodeError as exc:  # msgspec's error for a string that is not UTF-8
            raise msgspec.DecodeError(f"not UTF-8 at byte {exc.start}") from None


_head_decoder = _Decoder(_SnapshotHead)
_items_decoder = _Decoder(list[_Item])
_catalog_decoder = _Decoder(_Catalog)


def update_digest(h, rows: list[Row]) -> None:
    """Feed rows into a running sha256, a chunk at a time (equal digests: same content, same order)."""
    if rows:  # each item's JSON is unique to its content, so the JSON alone is digested
        h.update(b"\n".join(row[1] for row in rows) + b"\n")


def digest_of(rows: list[Row]) -> bytes:
    """Return the digest of a whole snapshot's rows."""
    h = hashlib.sha256()
    update_digest(h, rows)
    return h.digest()


class Malformed(ValueError):
    """A snapshot or catalog payload that breaks the contract; `reason` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def plain(payload: bytes, content_type: str | None) -> bytes:
    """Return the JSON bytes of a payload: inflated when its content type says zlib; raises Malformed."""
    if content_type != ZLIB_JSON:
        return payload
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_INFLATED)
    except zlib.error as exc:
        raise Malformed("decode", f"not valid zlib under content type {ZLIB_JSON}: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise Malformed("decode", f"zlib payload truncated or inflating past {MAX_INFLATED} bytes")
    return out


def decode_head(payload: bytes, store_id: str) -> _SnapshotHead:
    """Decode a snapshot's envelope, each item left as its raw JSON; raises Malformed."""
    try:
        head = _head_decoder.decode(payload)
    except msgspec.ValidationError as exc:  # before DecodeError: it is a subclass
        reason = "sources" if _TABLE_FIELD.search(str(exc)) else "shape"
        raise Malformed(reason, f"availability: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Malformed("decode", f"availability: not JSON: {exc}") from None
    if head.store_id != store_id:
        raise Malformed("store_id", f"availability: snapshot for store {head.store_id!r} on {store_id!r}'s topic")
    if not valid_time(head.generated_at):
        raise Malformed("shape", f"availability: generated_at {head.generated_at!r} is not a real date-time")
    _check_table(head.sources or ())
    return head


def _check_table(table) -> None:
    """Check the sources table's times and that no source_id is listed twice; raises Malformed("sources")."""
    seen: set[str] = set()
    for n, source in enumerate(table):
        if not valid_time(source.updated_at):
            raise Malformed("sources", f"availability: sources[{n}].updated_at {source.updated_at!r}"
                                       " is not a real date-time")
        if source.source_id in seen:
            raise Malformed("sources", f"availability: sources[{n}].source_id {source.source_id!r} is listed twice")
        seen.add(source.source_id)


def table_rows(head: _SnapshotHead) -> list[tuple]:
    """The snapshot's sources table as sync.db's rows: (position, source_id, name, kind,
    lead_time_s, updated_at, stale, stale_after_s), in the hub's order."""
    return [(n, s.source_id, s.name, s.kind, s.lead_time_s, s.updated_at, int(s.stale), s.stale_after_s)
            for n, s in enumerate(head.sources or ())]


def rows_from(slices: list[msgspec.Raw], chunk: int = CHUNK_ITEMS,
              source_ids: frozenset[str] | set[str] = frozenset()) -> tuple[list[Row], bytes]:
    """Decode and validate a snapshot's raw items into stored rows and their digest.

    `source_ids`: the ids of the snapshot's sources table; an item's `sources` may name
    only those. Raises Malformed naming the first bad item; a SKU listed twice is
    malformed too.
    """
    rows: list[Row] = []
    seen: set[str] = set()
    digest = hashlib.sha256()
    for start in range(0, len(slices), chunk):
        part = slices[start:start + chunk]
        try:
            items = _items_decoder.decode(b"[" + b",".join(part) + b"]")
        except msgspec.DecodeError as exc:  # ValidationError is one; JSON nested too deep too
            raise Malformed(_reason_of(str(exc)), f"availability: items (from item {start}): {exc}") from None
        _check_ids(items, start)
        # The item's JSON is stored as received: valid, and nothing to re-encode. A cap is
        # also stored on its own (validated, re-encoded), for the agent's decide-time read.
        new = [(item.sku, raw, item.online, None if item.cap is None else _check_cap(item, start + i))
               for i, (item, raw) in enumerate(zip(items, part))]
        for i, item in enumerate(items):
            if item.sources and not source_ids.issuperset(item.sources):
                _unknown_source(item, start + i, source_ids)
        seen.update(row[0] for row in new)
        rows.extend(new)
        if len(seen) != len(rows):
            raise Malformed("item", f"availability: a SKU is listed twice (items {start}..{start + len(part) - 1})")
        update_digest(digest, new)
    return rows, digest.digest()


def decode_catalog(payload: bytes, content_type: str | None) -> _Catalog:
    """Decode a `P/catalog` message (inflated when its content type says zlib); raises Malformed("catalog")."""
    try:
        return _catalog_decoder.decode(plain(payload, content_type))
    except Malformed as bad:
        raise Malformed("catalog", f"catalog: {bad}") from None
    except msgspec.DecodeError as exc:
        raise Malformed("catalog", f"catalog: {exc}") from None


def decode_snapshot(payload: bytes, content_type: str | None, store_id: str) -> tuple[_SnapshotHead, list[Row], bytes]:
    """Inflate, decode and check one snapshot message; return (head, rows, digest). Raises Malformed."""
    gc.disable()  # 100,000s of acyclic objects: full collections would only cost time
    try:
        head = decode_head(plain(payload, content_type), store_id)
        rows, digest = rows_from(head.items, source_ids={s.source_id for s in head.sources or ()})
    finally:
        gc.enable()
    return head, rows, digest


# msgspec names the field "at `$[3].cap.period`", or "at `key` in `$[3].sources`" for a key.
_ITEM_FIELD = re.compile(r"`\$\[\d+\]\.(sources|cap)\b")
_TABLE_FIELD = re.compile(r"`\$\.sources\b")


def _reason_of(message: str) -> str:
    """The drop reason of an item that does not decode: `sources` or `cap` when one of those is wrong."""
    found = _ITEM_FIELD.search(message)
    return found.group(1) if found else "item"


def _check_cap(item: _Item, index: int) -> bytes:
    """Check a cap's times; return its JSON to store. Raises Malformed("cap") naming the field."""
    cap = item.cap
    for name in ("period_start", "period_end"):
        if not valid_time(getattr(cap, name)):
            raise Malformed("cap", f"availability: item {index} ({item.sku}): cap.{name}"
                                   f" {getattr(cap, name)!r} is not a real date-time")
    if clock.parse_rfc3339(cap.period_end) <= clock.parse_rfc3339(cap.period_start):
        raise Malformed("cap", f"availability: item {index} ({item.sku}): cap.period_end {cap.period_end}"
                               f" is not after cap.period_start {cap.period_start}")
    return msgspec.json.encode(cap)


def _unknown_source(item: _Item, index: int, source_ids) -> None:
    """Raise Malformed("sources") naming the first of the item's sources not in the table."""
    bad = next(sid for sid in item.sources if sid not in source_ids)
    raise Malformed("sources", f"availability: item {index} ({item.sku}): sources.{bad}"
                               " is not in the snapshot's sources table")


_SKUS = re.compile(r"(?:[A-Za-z0-9._:-]{1,64}\n)*")
_STORE_ID = re.compile(STORE_ID_PATTERN)


def _check_ids(items: list[_Item], start: int) -> None:
    """Check every SKU (one regex over the chunk) and every distinct nearby store id."""
    if not _SKUS.fullmatch("".join(item.sku + "\n" for item in items)):
        bad = next(i for i, item in enumerate(items) if not _SKUS.fullmatch(item.sku + "\n"))
        raise Malformed("item", f"availability: item {start + bad}: invalid sku {items[bad].sku!r}")
    for store_id in {n.store_id for item in items for n in item.nearby}:
        if not _STORE_ID.match(store_id):
            raise Malformed("item", f"availability: invalid nearby store_id {store_id!r}")


class Downlink:
    """Applies the hub's snapshots and catalog for one store to the sync process's database."""

    def __init__(self, mqtt, prefix: str, store_id: str, state: SyncState):
        self.mqtt = mqtt
        self.prefix = prefix
        self.store_id = store_id
        self.state = state
        self.applied = 0
        self.ignored = 0
        self.drops: dict[str, int] = {}
        self.last_apply_s: float | None = None

    def attach(self) -> None:
        """Subscribe the availability and catalog topics (before or after the client starts)."""
        self.mqtt.subscribe(protocol.availability_topic(self.prefix, self.store_id), self.on_availability)
        self.mqtt.subscribe(protocol.catalog_topic(self.prefix), self.on_catalog)

    async def on_availability(self, message) -> None:
        """Apply one snapshot message; returns normally (so it is acked) unless storage failed.

        Decoding runs on a thread, so the uplink's acks keep being handled meanwhile.
        """
        started = time.perf_counter()
        try:
            head, rows, digest = await asyncio.to_thread(
                decode_snapshot, message.payload, getattr(message, "content_type", None), self.store_id)
        except Malformed as bad:
            await self._drop(bad.reason, str(bad), len(message.payload))
            return
        try:
            outcome = await self.state.apply_snapshot(head.version, head.generated_at, rows, digest,
                                                      sources=table_rows(head))
        except StorageError:
            log.exception("downlink: could not store snapshot for %s; left unacknowledged", self.store_id)
            raise
        took = time.perf_counter() - started   # receive to commit
        if not outcome.applied:
            self.ignored += 1
            await self.state.add_counts({"snapshots_ignored": 1})
            log.info("downlink: ignored availability snapshot %d for %s: holding %s",
                     head.version, self.store_id, outcome.held_version)
            return
        self.applied += 1
        self.last_apply_s = took
        await self.state.add_counts({"snapshots_applied": 1})
        log.info("downlink: applied availability snapshot %d for %s (%d items, %d changed, %d removed,"
                 " %d bytes, %.3f s)", head.version, self.store_id, len(rows), outcome.changed,
                 outcome.removed, len(message.payload), took)

    async def on_catalog(self, message) -> None:
        """Apply a catalog message if its version is newer; bad payloads are dropped and counted."""
        try:
            catalog = decode_catalog(message.payload, getattr(message, "content_type", None))
        except Malformed as bad:
            await self._drop(bad.reason, str(bad), len(message.payload))
            return
        if await self.state.apply_catalog(catalog.version, [(i.sku, i.name) for i in catalog.items]):
            log.info("downlink: applied catalog %d (%d items)", catalog.version, len(catalog.items))

    async def _drop(self, reason: str, text: str, size: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        await self.state.add_counts({f"dropped_{reason}": 1})
        log.warning("downlink: dropped a %d-byte message for %s (%s): %s", size, self.store_id, reason, text[:300])
