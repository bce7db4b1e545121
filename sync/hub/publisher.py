"""The hub's availability side: projection hooks, feeds, snapshot and catalog publishing.

    publisher = await AvailabilityPublisher.attach(service)   # before service.run
    await publisher.publish_changed()                         # the scheduled job (tests call it)

`attach` creates the tables (building the projection and the cap use from held events
the first time, moving a pre-sources database's warehouse feeds over), hooks
`projection.apply_events` and `captables.apply_usage` into the hub store's ingest
transaction, subscribes to the feeds (`P/warehouses/+/stock`, `P/sources/+/stock`,
`P/orders/+`, `P/caps/+`: sync/hub/inputs.py) and the stores' statuses, reads
`[caps] path`, and adds `run` (an APScheduler 3 job every
`availability.publish_interval_s`) to the service's jobs. Each run reads the caps file
again if it changed.

`publish_changed` computes every configured store's snapshot off the event loop (its own
read-only connection, in a thread: sync/hub/compute.py), then for each store that is due
persists the new version and any chain-cap allowance it changes first and publishes it
retained, QoS 1. Persisting first means a version is never reused and an allowance is
counted as promised before any store can see it, even after a crash between the two
steps; a store whose publish failed, and every store after a (re)connect (a broker
restart may lose retained messages), is forced due on the next run.

Only the leader (sync/hub/leader.py: on SQLite the one hub process, on PostgreSQL the
worker holding the advisory lock) folds the pending rows, computes, persists and
publishes; the other workers' runs do nothing. A version write is fenced
(`projection.record_published`): a worker deposed meanwhile writes nothing and publishes
nothing. A worker that becomes the leader forces every store due and republishes the catalog.

A store's retained status may carry `snapshot_version` (the snapshot it holds) and
`last_seq`: once the hub holds that store's events up to `last_seq`, allowances
published before that version no longer count as in force (sync/hub/caps.py).
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
import zoneinfo
from pathlib import Path
from typing import Callable

import msgspec

from common import clock
from common.aio import wait_for
from agent.events import SKU_PATTERN
from sync import protocol
from sync.hub import availability as av
from sync.hub import captables, feeds, projection, sqlcompat
from sync.hub import caps as capcore
from sync.hub.compute import Plan, compute
from sync.hub.inputs import FeedInputs
from sync.hub.leader import leader_for
from sync.hub.settings import zones

log = logging.getLogger("edge_hub.availability")

_SKU = re.compile(SKU_PATTERN)
PUBLISH_TIMEOUT_S = 30.0


class _StatusCaps(msgspec.Struct, frozen=True):
    """The optional fields of a store's status the cap split reads."""

    snapshot_version: int | None = None
    last_seq: int | None = None


_status_caps_decoder = msgspec.json.Decoder(_StatusCaps)


class AvailabilityPublisher:
    """Publishes each store's availability snapshot and the catalog for one HubService."""

    def __init__(self, service, now: Callable[[], float] = time.time, refresh_s: float | None = None,
                 leader=None):
        self.service = service
        self.store = service.store
        self.mqtt = service.mqtt
        self.prefix = service.prefix
        self.config = service.config
        self.counters = service.counters
        self.refresh_s = refresh_s if refresh_s is not None else self.config.availability.refresh_s
        self._now = now
        self._regions = av.regions_of((s.id, s.region) for s in self.config.stores)
        self.zones = zones(self.config)
        url = getattr(self.config.storage, "url", "") or ""
        self.leader = leader if leader is not None else leader_for(
            url, name=f"edge-hub-{self.config.hub.id}-{getattr(self.config.hub, 'worker', 0)}-leader")
        # The availability modules' transactions: the SQLite store's writer, or on PostgreSQL
        # a sync connection of their own (sqlcompat.PgRunner).
        self.db = sqlcompat.runner_for(self.store, url)
        self.plan = Plan(getattr(self.store, "path", None), self._regions, self.zones, [
            av.Source(s.id, s.display_name, s.kind, s.lead_time_s, s.stale_after_s) for s in self.config.sources],
            url=url)
        self.inputs = FeedInputs(service, now, db=self.db)
        self.inputs.leads = lambda: self.leader.is_leader
        self._day_cache: dict[tuple[str, str], str] = {}
        self.confirmed: dict[str, int] = {}                    # store -> snapshot version it holds (events held)
        self._confirming: dict[str, tuple[int, int]] = {}      # store -> (version, last_seq) not yet held
        self._force: set[str] = set(self.service.store_ids)
        self._lock = asyncio.Lock()
        self.last: dict[str, av.Snapshot] = {}
        self.sent_bytes: dict[str, int] = {}        # payload bytes of the last publish per store
        self._accept: dict[str, bool] = {}           # store_id -> reads zlib (its status says so)
        self.catalog_version: int | None = None
        self.compute_s = 0.0                          # the last run's snapshot computation, seconds
        self._catalog_payload: bytes | None = None

    @classmethod
    async def attach(cls, service, **kwargs) -> "AvailabilityPublisher":
        """Set up tables and hooks on a not-yet-running service; see the module docstring."""
        self = cls(service, **kwargs)
        folded = await self.db.run(projection.setup)
        if folded:
            log.info("hub: built the availability projection from %d held events", folded)
        moved = await self.db.run(feeds.setup)
        if moved:
            log.info("hub: moved %d warehouse feed rows to the source tables", moved)
        folded = await self.db.run(lambda conn: captables.setup(conn, self.day_of))
        if folded:
            log.info("hub: built the cap use from %d held events", folded)
        self.store.ingest_hooks.append(projection.pending_deltas)
        self.store.ingest_hooks.append(lambda store_id, events: captables.usage_rows(store_id, events, self.day_of))
        if hasattr(self.store, "pending_fold"):  # SQLite: fold in the ingest transaction every PENDING_ROWS rows
            self.store.pending_fold = (projection.PENDING_ROWS, projection.fold_pending)
        service.event_view = projection.EVENT_VIEW
        self.mqtt.subscribe(protocol.warehouses_filter(self.prefix), self.inputs.on_warehouse)
        self.mqtt.subscribe(protocol.sources_filter(self.prefix), self.inputs.on_source)
        self.mqtt.subscribe(protocol.orders_filter(self.prefix), self.inputs.on_orders)
        self.mqtt.subscribe(protocol.caps_filter(self.prefix), self.inputs.on_cap)
        self.mqtt.subscribe(protocol.all_status_filter(self.prefix), self.on_status)
        self.mqtt.on_connection_change(self._connection_changed)
        await self.inputs.load_caps_file()
        await self.load_catalog()
        self.leader.on_change(self._leader_changed)
        service.jobs.append(self.leader.run)
        service.jobs.append(self.run)
        return self

    # ----------------------------------------------------------------- inputs

    def day_of(self, store_id: str, recorded_at: str) -> str:
        """The local date of an event's `recorded_at` in its store's zone (cached per minute)."""
        key = (store_id, recorded_at[:16])
        day = self._day_cache.get(key)
        if day is None:
            if len(self._day_cache) > 100_000:
                self._day_cache.clear()
            zone = self.zones.get(store_id) or zoneinfo.ZoneInfo("UTC")
            day = self._day_cache[key] = capcore.local_day(clock.parse_rfc3339(recorded_at), zone)
        return day

    async def on_warehouse(self, message) -> None:
        """`P/warehouses/{id}/stock`: see sync/hub/inputs.py."""
        await self.inputs.on_warehouse(message)

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
        try:
            extra = _status_caps_decoder.decode(message.payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            extra = _StatusCaps()
        if extra.snapshot_version is not None and extra.last_seq is not None:
            self._confirming[store_id] = (extra.snapshot_version, extra.last_seq)
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

        self.catalog_version = await self.db.run(bump)
        self._catalog_payload = b'{"v":1,"version":%d,"items":%s}' % (self.catalog_version, body)
        log.info("hub: catalog %s: version %d, %d items", path, self.catalog_version, len(rows))

    # ---------------------------------------------------------------- outputs

    async def publish_catalog(self) -> None:
        """Publish the catalog retained (again) if this worker leads; agents ignore a version they hold."""
        if self._catalog_payload is None or not self.leader.is_leader:
            return
        await wait_for(self.mqtt.publish(protocol.catalog_topic(self.prefix), self._catalog_payload,
                                         qos=1, retain=True), PUBLISH_TIMEOUT_S)

    async def publish_changed(self) -> list[av.Snapshot]:
        """The scheduled job: publish every store's snapshot that is due; return what was published."""
        async with self._lock:
            if not self.leader.is_leader:
                return []
            now = self._now()
            force, self._force = self._force, set()
            previous = await self.db.run(_fold_and_read_published)
            confirmed = await self._confirmed()
            started = time.perf_counter()
            snapshots = await asyncio.to_thread(
                compute, self.plan, previous, force, now, int(self.refresh_s * 1000), confirmed)
            self.compute_s = time.perf_counter() - started
            if snapshots:
                log.info("hub: computed %d due snapshots of %d stores in %.3f s", len(snapshots),
                         len(self.service.store_ids), self.compute_s)
            out = []
            fence = self.leader.fence()
            for snap in snapshots:
                try:
                    await self.db.run(lambda conn, s=snap: _record(conn, s, confirmed.get(s.store_id), fence))
                except projection.Fenced as exc:  # deposed (or a newer version held): publish nothing more
                    self.counters["availability_fenced"] += 1
                    log.warning("hub: %s; this run stops", exc)
                    self._force |= {s.store_id for s in snapshots}
                    break
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
            if self.db is not self.store:
                self.db.close()

    async def _confirmed(self) -> dict[str, int]:
        """Promote a store's reported snapshot version once the hub holds its events up to then."""
        acks = await self.store.ack_states(list(self._confirming))
        for store_id, (version, last_seq) in list(self._confirming.items()):
            if acks[store_id].acked_seq >= last_seq:
                del self._confirming[store_id]
                self.confirmed[store_id] = max(version, self.confirmed.get(store_id, 0))
        return dict(self.confirmed)

    async def _tick(self) -> None:
        try:
            await self.inputs.load_caps_file()
            if self.mqtt.connected:
                await self.publish_changed()
        except Exception:
            self.counters["availability_job_failed"] += 1
            log.exception("hub: availability job failed")

    def _leader_changed(self, leading: bool) -> None:
        if leading:  # another worker led until now: republish everything from this one's view
            self._connection_changed(True)

    def _connection_changed(self, up: bool) -> None:
        if not up:
            return
        self._force |= set(self.service.store_ids)
        if self._catalog_payload is not None and self.leader.is_leader:
            task = asyncio.get_running_loop().create_task(self.publish_catalog())
            task.add_done_callback(_log_failure)


def _fold_and_read_published(conn: sqlite3.Connection) -> dict[str, av.Published]:
    projection.fold_pending(conn)  # so that `compute` reads hub_stock alone (its quick path)
    return projection.published(conn)


def _record(conn: sqlite3.Connection, snap: av.Snapshot, confirmed: int | None,
            fence: tuple[str, tuple] = ("1 = 1", ())) -> None:
    projection.record_published(conn, snap.store_id, snap.version, snap.digest, snap.generated_at_ms, fence)
    if snap.grants:
        captables.record_grants(conn, snap.store_id, snap.version, snap.grants, confirmed)


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


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("hub: catalog publish failed: %s", task.exception())
