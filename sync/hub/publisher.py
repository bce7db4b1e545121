"""The hub's availability side: projection hook, warehouse feeds, snapshot and catalog publishing.

    publisher = await AvailabilityPublisher.attach(service)   # before service.run
    await publisher.publish_changed()                         # the scheduled job (tests call it)

`attach` creates the tables (building the projection from held events the first time),
hooks `projection.apply_events` into the hub store's ingest transaction, subscribes to
the warehouse feeds (`P/warehouses/+/stock`) and adds `run` (an APScheduler 3 job every
`availability.publish_interval_s`) to the service's jobs.

`publish_changed` computes every configured store's snapshot off the event loop (its own
read-only connection, in a thread), then for each store that is due persists the new
version first and publishes it retained, QoS 1. Persisting first means a version is never
reused, even after a crash between the two steps; a store whose publish failed, and every
store after a (re)connect (a broker restart may lose retained messages), is forced due on
the next run.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
import re
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Callable

import msgspec

from common import clock
from common.aio import wait_for
from agent.events import SKU_PATTERN
from sync import protocol
from sync.hub import availability as av
from sync.hub import projection

log = logging.getLogger("edge_hub.availability")

_SKU = re.compile(SKU_PATTERN)
PUBLISH_TIMEOUT_S = 30.0


class _WarehouseItem(msgspec.Struct, frozen=True, gc=False):
    sku: str
    available: int


class _WarehouseStock(msgspec.Struct, frozen=True):
    v: int
    warehouse_id: str
    version: int
    items: list[_WarehouseItem]


_warehouse_decoder = msgspec.json.Decoder(_WarehouseStock)


class AvailabilityPublisher:
    """Publishes each store's availability snapshot and the catalog for one HubService."""

    def __init__(self, service, now: Callable[[], float] = time.time, refresh_s: float | None = None):
        self.service = service
        self.store = service.store
        self.mqtt = service.mqtt
        self.prefix = service.prefix
        self.config = service.config
        self.counters = service.counters
        self.refresh_s = refresh_s if refresh_s is not None else self.config.availability.refresh_s
        self._now = now
        self._regions = av.regions_of((s.id, s.region) for s in self.config.stores)
        self._force: set[str] = set(self.service.store_ids)
        self._lock = asyncio.Lock()
        self.last: dict[str, av.Snapshot] = {}
        self.sent_bytes: dict[str, int] = {}        # payload bytes of the last publish per store
        self._accept: dict[str, bool] = {}           # store_id -> reads zlib (its status says so)
        self.catalog_version: int | None = None
        self._catalog_payload: bytes | None = None

    @classmethod
    async def attach(cls, service, **kwargs) -> "AvailabilityPublisher":
        """Set up tables and hooks on a not-yet-running service; see the module docstring."""
        self = cls(service, **kwargs)
        folded = await self.store.run(projection.setup)
        if folded:
            log.info("hub: built the availability projection from %d held events", folded)
        self.store.ingest_hooks.append(projection.apply_events)
        service.event_view = projection.EVENT_VIEW
        self.mqtt.subscribe(protocol.warehouses_filter(self.prefix), self.on_warehouse)
        self.mqtt.subscribe(protocol.all_status_filter(self.prefix), self.on_status)
        self.mqtt.on_connection_change(self._connection_changed)
        await self.load_catalog()
        service.jobs.append(self.run)
        return self

    # ----------------------------------------------------------------- inputs

    async def on_warehouse(self, message) -> None:
        """The handler for `P/warehouses/+/stock`: store a newer feed; drop and count bad ones."""
        warehouse_id = _warehouse_of(self.prefix, message.topic)
        try:
            feed = _warehouse_decoder.decode(message.payload)
            problem = _warehouse_problem(feed, warehouse_id)
        except msgspec.ValidationError as exc:
            problem = f"shape: {exc}"
        except msgspec.DecodeError as exc:
            problem = f"not JSON: {exc}"
        if problem:
            self.counters["warehouse_dropped"] += 1
            log.warning("hub: dropped warehouse feed on %s: %s", message.topic, problem[:300])
            return
        items = [(i.sku, i.available) for i in feed.items]
        if await self.store.run(lambda conn: projection.replace_warehouse(conn, feed.warehouse_id, feed.version, items)):
            self.counters["warehouse_applied"] += 1
            log.info("hub: warehouse %s feed %d (%d items)", feed.warehouse_id, feed.version, len(items))

    async def on_status(self, message) -> None:
        """The handler for `P/stores/+/status`: learn whether the store's agent reads zlib snapshots."""
        store_id = protocol.store_of(self.prefix, message.topic, "status")
        if store_id not in self.service.store_ids:
            return
        try:
            status = protocol.decode(message.payload, protocol.Status)
        except protocol.ProtocolError as exc:
            self.counters["status_dropped"] += 1
            log.warning("hub: dropped status on %s: %s", message.topic, str(exc)[:300])
            return
        zlib_ok = protocol.ZLIB_JSON in status.accept
        if self._accept.get(store_id, False) != zlib_ok:
            self._accept[store_id] = zlib_ok
            self._force.add(store_id)  # republish in the encoding the agent now reads

    def compresses(self, store_id: str) -> bool:
        """Whether the store's snapshots go out zlib-compressed (MQTT 5 and the agent accepts it)."""
        return self.mqtt.protocol == 5 and self._accept.get(store_id, False)

    async def load_catalog(self) -> None:
        """Read `[catalog] path` (CSV sku,name); its version grows when the file's content changes."""
        path = self.config.catalog.path
        if not path:
            return
        rows = read_catalog(path)
        body = protocol.encode([protocol.CatalogItem(sku, name) for sku, name in rows])
        digest = hashlib.sha256(body).hexdigest()

        def bump(conn: sqlite3.Connection) -> int:
            version = int(projection.get_meta(conn, "catalog_version") or 0)
            if projection.get_meta(conn, "catalog_digest") != digest:
                version += 1
                projection.set_meta(conn, "catalog_version", str(version))
                projection.set_meta(conn, "catalog_digest", digest)
            return version

        self.catalog_version = await self.store.run(bump)
        self._catalog_payload = b'{"v":1,"version":%d,"items":%s}' % (self.catalog_version, body)
        log.info("hub: catalog %s: version %d, %d items", path, self.catalog_version, len(rows))

    # ---------------------------------------------------------------- outputs

    async def publish_catalog(self) -> None:
        """Publish the catalog retained (again); agents ignore a version they hold."""
        if self._catalog_payload is None:
            return
        await wait_for(self.mqtt.publish(protocol.catalog_topic(self.prefix), self._catalog_payload,
                                         qos=1, retain=True), PUBLISH_TIMEOUT_S)

    async def publish_changed(self) -> list[av.Snapshot]:
        """The scheduled job: publish every store's snapshot that is due; return what was published."""
        async with self._lock:
            now = self._now()
            now_ms = int(now * 1000)
            generated_at = clock.rfc3339(now)
            force, self._force = self._force, set()
            previous = await self.store.run(_fold_and_read_published)
            snapshots = await asyncio.to_thread(
                compute, self.store.path, self._regions, previous, force, now_ms,
                int(self.refresh_s * 1000), generated_at)
            out = []
            for snap in snapshots:
                await self.store.run(lambda conn, s=snap: projection.record_published(
                    conn, s.store_id, s.version, s.digest, s.generated_at_ms))
                payload, content_type = snap.payload, None
                if self.compresses(snap.store_id):
                    payload = await asyncio.to_thread(zlib.compress, snap.payload, 6)
                    content_type = protocol.ZLIB_JSON
                try:
                    await wait_for(self.mqtt.publish(
                        protocol.availability_topic(self.prefix, snap.store_id), payload,
                        qos=1, retain=True, content_type=content_type), PUBLISH_TIMEOUT_S)
                except Exception as exc:  # a publish failure must not stop the job for other stores
                    self._force.add(snap.store_id)
                    self.counters["availability_publish_failed"] += 1
                    log.warning("hub: availability %d for %s not published: %s", snap.version, snap.store_id, exc)
                    continue
                self.last[snap.store_id] = snap
                self.sent_bytes[snap.store_id] = len(payload)
                self.counters["availability_published"] += 1
                out.append(snap)
                log.info("hub: published availability %d for %s (%d items, %d bytes%s)",
                         snap.version, snap.store_id, snap.items, len(payload),
                         f", zlib of {len(snap.payload)}" if content_type else "")
            return out

    async def run(self) -> None:
        """Run `publish_changed` every `availability.publish_interval_s` (APScheduler) until cancelled."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler()
        scheduler.add_job(self._tick, "interval", seconds=self.config.availability.publish_interval_s,
                          id="availability", max_instances=1, coalesce=True,
                          misfire_grace_time=int(self.config.availability.publish_interval_s) + 1)
        scheduler.start()
        try:
            await asyncio.Event().wait()
        finally:
            scheduler.shutdown(wait=False)

    async def _tick(self) -> None:
        try:
            if self.mqtt.connected:
                await self.publish_changed()
        except Exception:
            self.counters["availability_job_failed"] += 1
            log.exception("hub: availability job failed")

    def _connection_changed(self, up: bool) -> None:
        if not up:
            return
        self._force |= set(self.service.store_ids)
        if self._catalog_payload is not None:
            task = asyncio.get_running_loop().create_task(self.publish_catalog())
            task.add_done_callback(_log_failure)


def _fold_and_read_published(conn: sqlite3.Connection) -> dict[str, av.Published]:
    projection.fold_pending(conn)  # so that `compute` reads hub_stock alone (its quick path)
    return projection.published(conn)


def compute(db_path, regions: dict[str, list[str]], previous: dict[str, av.Published], force: set[str],
            now_ms: int, refresh_ms: int, generated_at: str) -> list[av.Snapshot]:
    """Read the projection and feeds (own read-only connection) and build the due snapshots."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one consistent view of stock and feeds
        available = projection.available_by_store(conn)
        online = av.online_of(projection.warehouse_feeds(conn))
        conn.execute("COMMIT")
    finally:
        conn.close()
    out = []
    for members in regions.values():
        for store_id, items in av.region_items(members, available, online).items():
            snap = av.build(store_id, items, previous.get(store_id), now_ms, refresh_ms, generated_at,
                            force=store_id in force)
            if snap is not None:
                out.append(snap)
    return out


def read_catalog(path: str | Path) -> list[tuple[str, str]]:
    """Read a catalog CSV (header sku,name); rows with an invalid SKU are skipped with a warning."""
    rows: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            sku, name = (row.get("sku") or "").strip(), (row.get("name") or "").strip()
            if not _SKU.match(sku):
                log.warning("hub: catalog %s line %d: invalid sku %r skipped", path, line, sku)
                continue
            rows[sku] = name
    return sorted(rows.items())


def _warehouse_of(prefix: str, topic: str) -> str | None:
    lead, tail = f"{prefix}/warehouses/", "/stock"
    if topic.startswith(lead) and topic.endswith(tail):
        return topic[len(lead):-len(tail)]
    return None


def _warehouse_problem(feed: _WarehouseStock, topic_id: str | None) -> str | None:
    if feed.v != 1:
        return f"v is {feed.v}, expected 1"
    if feed.warehouse_id != topic_id:
        return f"payload warehouse_id {feed.warehouse_id!r} differs from the topic's {topic_id!r}"
    if feed.version < 0:
        return f"version {feed.version} is negative"
    for item in feed.items:
        if not _SKU.match(item.sku) or item.available < 0:
            return f"item {item.sku!r}: invalid sku or negative available {item.available}"
    return None


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("hub: catalog publish failed: %s", task.exception())
