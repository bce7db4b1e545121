"""The hub's external feeds: source stock lists, open orders and caps (MQTT and file).

    inputs = FeedInputs(service, now)      # AvailabilityPublisher wires its handlers
    await inputs.on_source(message)        # P/sources/{id}/stock and P/warehouses/{id}/stock
    await inputs.on_orders(message)        # P/orders/{source_id}
    await inputs.on_cap(message)           # P/caps/{sku}
    await inputs.load_caps_file()          # [caps] path, at start and when it changes

Every message is validated as a whole before anything is stored: a refused one changes
nothing, is counted by reason (in memory, `HubService.counters`, and for ever in hub.db's
`rejection_counts`, which `edge-hub stats` prints) and logged at most once a minute per
reason. Only configured `[[sources]]` are accepted (`P/warehouses/{id}/stock` only for a
source of kind warehouse); the orders topic takes a configured source id or "online".
Reasons: `source_undecodable`, `source_invalid`, `source_unconfigured`,
`orders_undecodable`, `orders_invalid`, `orders_unconfigured`, `cap_undecodable`,
`cap_invalid`, `caps_file_invalid`.

With several workers on PostgreSQL each worker receives and applies every feed message
(sync/hub/feeds.py); a refusal is counted in each worker's memory but recorded in the
database by the leader alone (`leads`), so `rejection_counts` counts it once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable

from agent.events import SKU_PATTERN
from common import clock
from sync import protocol
from sync.hub import captables, feeds
from sync.hub import caps as capcore
from sync.hub.store import Rejection

log = logging.getLogger("edge_hub.feeds")

_SKU = re.compile(SKU_PATTERN)
MAX_ORDERS = 10_000
ORDER_STATES = ("open", "fulfilled", "cancelled")


class Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _level(prefix: str, topic: str, lead: str, tail: str = "") -> str | None:
    """Return the one topic level between `P/{lead}/` and `tail`, or None."""
    head = f"{prefix}/{lead}/"
    if topic.startswith(head) and topic.endswith(tail):
        level = topic[len(head):len(topic) - len(tail)]
        if level and "/" not in level:
            return level
    return None


def _decode(payload: bytes, cls, what: str):
    try:
        return protocol.decode(payload, cls)
    except protocol.ProtocolError as exc:
        raise Refused(f"{what}_undecodable", str(exc)) from None


def check_stock(feed: protocol.SourceStock, topic_id: str, id_field: str) -> list[tuple[str, int]]:
    """Return the feed's (sku, available) items; raise Refused("source_invalid") naming the field."""
    if feed.v != 1:
        raise Refused("source_invalid", f"v is {feed.v}, expected 1")
    if feed.source_id != topic_id:
        raise Refused("source_invalid", f"{id_field}: {feed.source_id!r} differs from the topic's {topic_id!r}")
    seen: set[str] = set()
    for i, item in enumerate(feed.items):
        if not _SKU.match(item.sku):
            raise Refused("source_invalid", f"items[{i}].sku: {item.sku!r} is not a valid SKU")
        if item.available < 0:
            raise Refused("source_invalid", f"items[{i}].available: {item.available} is negative")
        if item.sku in seen:
            raise Refused("source_invalid", f"items[{i}].sku: {item.sku!r} is listed twice")
        seen.add(item.sku)
    return [(item.sku, item.available) for item in feed.items]


def check_orders(message: protocol.OrdersMessage) -> list[tuple[str, str, int, str]]:
    """Return the (order_id, sku, qty, state) orders; raise Refused("orders_invalid") naming the field.

    An order id listed twice in one message keeps its last entry (the later state).
    """
    if message.v != 1:
        raise Refused("orders_invalid", f"v is {message.v!r}, expected 1")
    if len(message.orders) > MAX_ORDERS:
        raise Refused("orders_invalid", f"orders: {len(message.orders)} orders, at most {MAX_ORDERS}")
    out: dict[str, tuple[str, str, int, str]] = {}
    for i, order in enumerate(message.orders):
        if not 1 <= len(order.order_id) <= 128:
            raise Refused("orders_invalid", f"orders[{i}].order_id: must be 1 to 128 characters")
        if not _SKU.match(order.sku):
            raise Refused("orders_invalid", f"orders[{i}].sku: {order.sku!r} is not a valid SKU")
        if isinstance(order.qty, bool) or not 1 <= order.qty <= capcore.MAX_LIMIT:
            raise Refused("orders_invalid", f"orders[{i}].qty: {order.qty!r} is not an integer from 1")
        if order.state not in ORDER_STATES:
            raise Refused("orders_invalid", f"orders[{i}].state: {order.state!r} is not one of"
                                            f" {', '.join(ORDER_STATES)}")
        out.pop(order.order_id, None)
        out[order.order_id] = (order.order_id, order.sku, order.qty, order.state)
    return list(out.values())


def parse_cap(payload: bytes, topic_sku: str | None, stores) -> capcore.Cap:
    """Decode and check a cap message; raise Refused naming the field."""
    raw = _decode(payload, protocol.CapMessage, "cap")
    try:
        return capcore.check(raw.sku, raw.limit, raw.period, raw.scope, raw.store_id, raw.v,
                             topic_sku=topic_sku, stores=stores)
    except capcore.CapError as exc:
        raise Refused("cap_invalid", str(exc)) from None


def read_caps_file(path: str, stores) -> list[capcore.Cap]:
    """Read a JSON-lines caps file (blank lines and lines starting with # skipped).

    Raises Refused("caps_file_invalid") naming the line and field of the first bad line,
    or a SKU listed twice.
    """
    out: dict[str, capcore.Cap] = {}
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                cap = parse_cap(line, None, stores)
            except Refused as exc:
                raise Refused("caps_file_invalid", f"{path} line {number}: {exc.detail}") from None
            if cap.sku in out:
                raise Refused("caps_file_invalid", f"{path} line {number}: sku: {cap.sku!r} is listed twice")
            out[cap.sku] = cap
    return list(out.values())


class FeedInputs:
    """Validates and stores the hub's external feeds for one HubService."""

    def __init__(self, service, now: Callable[[], float] = time.time, changed: Callable[[], None] = lambda: None,
                 db=None):
        self.service = service
        self.store = service.store
        self.db = db if db is not None else service.store  # where feed writes run (`run(fn)`)
        self.prefix = service.prefix
        self.counters = service.counters
        self._now = now
        self._changed = changed
        self.sources = {s.id: s for s in service.config.sources}
        self.caps_path = service.config.caps.path
        self._caps_file_seen: tuple | None = None
        self.leads: Callable[[], bool] = lambda: True  # whether this worker records refusals (the leader)

    async def refuse(self, topic: str, exc: Refused) -> None:
        """Count (memory and hub.db) and log a refused feed message; nothing else changes."""
        self.counters[exc.reason] += 1
        self.service.refusals.refused(None, exc.reason, topic, exc.detail)
        if self.leads():
            await self.store.write([Rejection(topic, None, exc.reason, exc.detail)], clock.rfc3339(self._now()))

    # ---------------------------------------------------------------- stock

    async def on_warehouse(self, message) -> None:
        """`P/warehouses/{id}/stock` (the contract's feed): accepted for a configured warehouse source."""
        topic_id = _level(self.prefix, message.topic, "warehouses", "/stock")
        try:
            raw = _decode(message.payload, protocol.WarehouseStock, "source")
            feed = protocol.SourceStock(source_id=raw.warehouse_id, version=raw.version, items=raw.items, v=raw.v)
            await self._stock(message.topic, topic_id, feed, "warehouse_id", warehouse_only=True)
        except Refused as exc:
            await self.refuse(message.topic, exc)

    async def on_source(self, message) -> None:
        """`P/sources/{id}/stock`: a configured source's whole list (a newer version replaces it)."""
        topic_id = _level(self.prefix, message.topic, "sources", "/stock")
        try:
            feed = _decode(message.payload, protocol.SourceStock, "source")
            await self._stock(message.topic, topic_id, feed, "source_id")
        except Refused as exc:
            await self.refuse(message.topic, exc)

    async def _stock(self, topic: str, topic_id: str | None, feed: protocol.SourceStock, id_field: str,
                     warehouse_only: bool = False) -> None:
        source = self.sources.get(topic_id or "")
        if source is None:
            raise Refused("source_unconfigured", f"source {topic_id!r} is not in the hub's [[sources]]")
        if warehouse_only and source.kind != "warehouse":
            raise Refused("source_unconfigured", f"source {topic_id!r} is a {source.kind}, not a warehouse")
        items = check_stock(feed, topic_id, id_field)
        now_ms = int(self._now() * 1000)
        if await self.db.run(lambda conn: feeds.replace_source(conn, topic_id, feed.version, items, now_ms)):
            self.counters["source_applied"] += 1
            log.info("hub: source %s feed %d (%d items)", topic_id, feed.version, len(items))
            self._changed()
        else:
            self.counters["source_not_newer"] += 1

    # --------------------------------------------------------------- orders

    async def on_orders(self, message) -> None:
        """`P/orders/{source_id}`: record each order's latest state (deduplicated by order id)."""
        source_id = _level(self.prefix, message.topic, "orders")
        try:
            if source_id != protocol.ONLINE and source_id not in self.sources:
                raise Refused("orders_unconfigured", f"source {source_id!r} is not in the hub's [[sources]]"
                                                     " (nor 'online')")
            orders = check_orders(_decode(message.payload, protocol.OrdersMessage, "orders"))
        except Refused as exc:
            await self.refuse(message.topic, exc)
            return
        now_ms = int(self._now() * 1000)
        applied, ignored = await self.db.run(lambda conn: feeds.apply_orders(conn, source_id, orders, now_ms))
        self.counters["orders_applied"] += applied
        self.counters["orders_unchanged"] += ignored
        log.info("hub: orders for %s: %d applied, %d unchanged or closed", source_id, applied, ignored)
        if applied:
            self._changed()

    # ----------------------------------------------------------------- caps

    async def on_cap(self, message) -> None:
        """`P/caps/{sku}` (retained): set the SKU's cap; an empty payload clears it."""
        sku = _level(self.prefix, message.topic, "caps")
        now_ms = int(self._now() * 1000)
        try:
            if sku is None or not _SKU.match(sku):
                raise Refused("cap_invalid", f"sku: the topic's {sku!r} is not a valid SKU")
            if not message.payload:
                if await self.db.run(lambda conn: captables.clear_cap(conn, sku, "mqtt")):
                    log.info("hub: cap on %s cleared", sku)
                    self._changed()
                return
            cap = parse_cap(message.payload, sku, self.service.store_ids)
        except Refused as exc:
            await self.refuse(message.topic, exc)
            return
        if await self.db.run(lambda conn: captables.set_cap(conn, cap, "mqtt", now_ms)):
            self.counters["caps_set"] += 1
            log.info("hub: cap on %s: %d per %s (%s%s)", cap.sku, cap.limit, cap.period, cap.scope,
                     f" {cap.store_id}" if cap.store_id else "")
            self._changed()

    async def load_caps_file(self) -> bool:
        """Read `[caps] path` if it changed since the last read (or was never read); return whether it did.

        A file with a bad line changes nothing (the caps read before stay), is counted and logged.
        """
        if not self.caps_path:
            return False
        try:
            st = os.stat(self.caps_path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._caps_file_seen:
            return False
        self._caps_file_seen = seen
        try:
            caps = read_caps_file(self.caps_path, self.service.store_ids) if seen is not None else []
        except (Refused, OSError) as exc:
            refusal = exc if isinstance(exc, Refused) else Refused("caps_file_invalid", f"{self.caps_path}: {exc}")
            await self.refuse(self.caps_path, refusal)
            return False
        now_ms = int(self._now() * 1000)
        changed = await self.db.run(lambda conn: captables.replace_file_caps(conn, caps, now_ms))
        log.info("hub: caps file %s: %d caps, %d changed", self.caps_path, len(caps), changed)
        if changed:
            self._changed()
        return True
