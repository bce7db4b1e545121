"""Hub -> agent: apply availability snapshots and the catalog from their retained topics.

Subscribes (on the agent's one MqttClient) to `P/stores/{store_id}/availability` and
`P/catalog`. The MQTT adapter acknowledges a message only after the handler returns, so
a snapshot is acked after it committed; a retained snapshot published while the agent
was offline arrives again on (re)connect and is applied then if it is newer.

A snapshot is inflated, decoded, validated and written by `apply_payload` in the
snapshot store's worker process (`SnapshotStore.apply_in_worker`), so a 100,000-SKU
payload never holds this process's event loop or GIL: kiosk reads keep being answered
from the previous snapshot until the new one commits. The handler only awaits it.

Bad input (not JSON, wrong shape, another store's id, a SKU or count that breaks the
contract) is logged, counted (`drops[reason]`, `edge_agent_downlink_dropped`) and
acknowledged: redelivering it would not make it valid. The held snapshot stays.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import time
import zlib
from typing import Annotated, Literal

import msgspec

from common.errors import StorageError
from agent.events import SKU_PATTERN, STORE_ID_PATTERN, TIME_PATTERN, valid_time
from agent.snapshots import Row, SnapshotStore, update_digest, write_rows
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


class _Item(msgspec.Struct, frozen=True, gc=False):
    sku: str               # checked a chunk at a time, see _check_ids
    nearby: list[_Nearby]
    online: _Count | None = None


class _SnapshotHead(msgspec.Struct, frozen=True):
    v: Literal[1]
    store_id: Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
    version: _Count
    generated_at: Annotated[str, msgspec.Meta(pattern=TIME_PATTERN)]
    items: list[msgspec.Raw]   # each item's JSON, decoded and checked later in chunks


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


_head_decoder = _Decoder(_SnapshotHead)
_items_decoder = _Decoder(list[_Item])
_catalog_decoder = _Decoder(_Catalog)


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
        raise Malformed("shape", f"availability: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Malformed("decode", f"availability: not JSON: {exc}") from None
    if head.store_id != store_id:
        raise Malformed("store_id", f"availability: snapshot for store {head.store_id!r} on {store_id!r}'s topic")
    if not valid_time(head.generated_at):
        raise Malformed("shape", f"availability: generated_at {head.generated_at!r} is not a real date-time")
    return head


def rows_from(slices: list[msgspec.Raw], chunk: int = CHUNK_ITEMS) -> tuple[list[Row], bytes]:
    """Decode and validate a snapshot's raw items into stored rows and their digest.

    Raises Malformed naming the first bad item; a SKU listed twice is malformed too.
    """
    rows: list[Row] = []
    seen: set[str] = set()
    digest = hashlib.sha256()
    for start in range(0, len(slices), chunk):
        part = slices[start:start + chunk]
        try:
            items = _items_decoder.decode(b"[" + b",".join(part) + b"]")
        except msgspec.DecodeError as exc:  # ValidationError is one; JSON nested too deep too
            raise Malformed("item", f"availability: items (from item {start}): {exc}") from None
        _check_ids(items, start)
        # The item's JSON is stored as received: valid, and nothing to re-encode.
        new = [(item.sku, raw, item.online) for item, raw in zip(items, part)]
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


def apply_payload(path: str, applied_at: str, payload: bytes, content_type: str | None,
                  store_id: str) -> tuple:
    """Decode, check and store one snapshot message (runs in the snapshot worker process).

    Returns ("malformed", reason, text) or ("done", ApplyOutcome, version, items).
    Raises StorageError when the snapshot file cannot commit.
    """
    gc.disable()  # 100,000s of acyclic objects: full collections would only cost time
    try:
        head = decode_head(plain(payload, content_type), store_id)
        rows, digest = rows_from(head.items)
    except Malformed as bad:
        return ("malformed", bad.reason, str(bad))
    finally:
        gc.enable()
    return ("done", write_rows(path, head.version, head.generated_at, applied_at, rows, digest),
            head.version, len(rows))


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
    """Applies the hub's snapshots and catalog for one store; attach it to the agent's MqttClient."""

    def __init__(self, mqtt, prefix: str, store_id: str, snapshots: SnapshotStore,
                 metrics=None):
        self.mqtt = mqtt
        self.prefix = prefix
        self.store_id = store_id
        self.snapshots = snapshots
        self.applied = 0
        self.ignored = 0
        self.drops: dict[str, int] = {}
        self.last_apply_s: float | None = None
        self._metrics = _Metrics(metrics.registry) if metrics is not None else None

    def attach(self) -> None:
        """Subscribe the availability and catalog topics (before or after the client starts)."""
        self.mqtt.subscribe(protocol.availability_topic(self.prefix, self.store_id), self.on_availability)
        self.mqtt.subscribe(protocol.catalog_topic(self.prefix), self.on_catalog)

    async def on_availability(self, message) -> None:
        """Apply one snapshot message; returns normally (so it is acked) unless storage failed."""
        started = time.perf_counter()
        try:
            result = await self.snapshots.apply_in_worker(
                apply_payload, message.payload, getattr(message, "content_type", None), self.store_id)
        except StorageError:
            log.exception("downlink: could not store snapshot for %s; left unacknowledged", self.store_id)
            raise
        took = time.perf_counter() - started   # receive to commit
        if result[0] == "malformed":
            self._drop(result[1], result[2], len(message.payload))
            return
        _, outcome, version, count = result
        if not outcome.applied:
            self._ignore(version, outcome.held_version)
            return
        self.applied += 1
        self.last_apply_s = took
        if self._metrics:
            self._metrics.applied.inc()
            self._metrics.version.set(version)
            self._metrics.apply_seconds.observe(self.last_apply_s)
        log.info("downlink: applied availability snapshot %d for %s (%d items, %d changed, %d removed,"
                 " %d bytes, %.3f s)", version, self.store_id, count, outcome.changed,
                 outcome.removed, len(message.payload), self.last_apply_s)

    async def on_catalog(self, message) -> None:
        """Apply a catalog message if its version is newer; bad payloads are dropped and counted."""
        try:
            catalog = _catalog_decoder.decode(plain(message.payload, getattr(message, "content_type", None)))
        except Malformed as bad:
            self._drop("catalog", f"catalog: {bad}", len(message.payload))
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop("catalog", f"catalog: {exc}", len(message.payload))
            return
        if await self.snapshots.catalog.apply(catalog.version, [(i.sku, i.name) for i in catalog.items]):
            log.info("downlink: applied catalog %d (%d items)", catalog.version, len(catalog.items))

    def _ignore(self, version: int, held: int | None) -> None:
        self.ignored += 1
        if self._metrics:
            self._metrics.ignored.inc()
        log.info("downlink: ignored availability snapshot %d for %s: holding %s",
                 version, self.store_id, held)

    def _drop(self, reason: str, text: str, size: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if self._metrics:
            self._metrics.dropped.labels(reason).inc()
        log.warning("downlink: dropped a %d-byte message for %s (%s): %s", size, self.store_id, reason, text[:300])


class _Metrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        self.applied = Counter("edge_agent_snapshots_applied", "Availability snapshots applied.",
                               registry=registry)
        self.ignored = Counter("edge_agent_snapshots_ignored",
                               "Availability snapshots ignored: version not newer than the held one.",
                               registry=registry)
        self.dropped = Counter("edge_agent_downlink_dropped",
                               "Downlink messages dropped as malformed, by reason.", ["reason"],
                               registry=registry)
        self.version = Gauge("edge_agent_snapshot_version", "Version of the held availability snapshot.",
                             registry=registry)
        self.apply_seconds = Histogram(
            "edge_agent_snapshot_apply_seconds", "Time from receiving a snapshot to its commit.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=registry)
