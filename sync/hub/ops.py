"""A hub worker's operations face: GET /metrics (Prometheus), GET /healthz, and the rows of `edge-hub stores`.

`OpsServer` serves on `hub.http_host:hub.http_port` (loopback by default; 0 = off), one
per worker: each worker counts what it ingested, so a dashboard sums them across
workers. The per-store figures (ack, ack lag) come from the storage, so every worker
answers the same for them. /healthz answers 200 while the MQTT link is up and the
ingest writer runs, 503 naming what is not.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

log = logging.getLogger("edge_hub.ops")

SCRAPE_ROWS_TIMEOUT_S = 5.0


def store_lines(rows: Iterable[dict], store_ids: Iterable[str] = ()) -> list[dict]:
    """`edge-hub stores`: each store's last ack, rev, backlog estimate and last contact.

    The backlog estimate is the highest seq the hub has seen from the store (its last
    batch) minus its ack: events held beyond a gap. The store's own backlog can only be
    larger (what it has not sent yet), so this is a lower bound. `last_contact` is when
    the hub last committed a batch of the store (None: never). A configured store
    (`store_ids`) the hub never heard from is listed with zeros.
    """
    held = {row["store_id"]: row for row in rows}
    for store_id in store_ids:
        held.setdefault(store_id, {"store_id": store_id, "acked_seq": 0, "max_seq": 0})
    out = []
    for row in (held[s] for s in sorted(held)):
        out.append({"store_id": row["store_id"], "acked_seq": row["acked_seq"], "rev": row.get("rev", 0),
                    "max_seq": row["max_seq"], "backlog_estimate": max(0, (row["max_seq"] or 0) - row["acked_seq"]),
                    "last_contact": row.get("updated_at"), "incarnation": row.get("incarnation"),
                    "conflicts": row.get("conflicts", 0)})
    return out


class OpsServer:
    """The worker's HTTP endpoints; `await start()`, `await stop()`."""

    def __init__(self, service, host: str, port: int):
        self.service = service
        self.host, self.port = host, port
        self._runner = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.bound_port = site._server.sockets[0].getsockname()[1]   # the port when 0 was asked
        log.info("hub: /metrics and /healthz on http://%s:%d", self.host, self.bound_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def run(self) -> None:
        """A hub job: serve until cancelled."""
        import asyncio

        try:
            await self.start()
        except OSError as exc:
            # The ingest goes on without its HTTP face; say so where an operator looks.
            log.error("hub: cannot serve /metrics on %s:%d: %s", self.host, self.port, exc)
            raise
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # ---------------------------------------------------------------- handlers

    def health(self) -> tuple[bool, dict]:
        service = self.service
        writer = getattr(service, "writer_task", None)
        checks = {"mqtt_connected": service.mqtt.connected,
                  "writer_running": writer is not None and not writer.done()}
        return all(checks.values()), checks

    async def healthz(self, request):
        from aiohttp import web

        ok, checks = self.health()
        return web.json_response({"ok": ok, "worker": self.service.config.hub.worker, **checks},
                                 status=200 if ok else 503)

    async def metrics(self, request):
        from aiohttp import web
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        import asyncio

        try:
            rows = await asyncio.wait_for(self.service.store.store_rows(), SCRAPE_ROWS_TIMEOUT_S)
        except Exception as exc:   # the storage's trouble shows as a gauge, not as a failed scrape
            log.warning("hub: /metrics could not read the stores: %s", exc)
            rows = None
        families = list(self._families(rows, CounterMetricFamily, GaugeMetricFamily))

        class _Collector:
            def collect(self):
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return web.Response(body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"})

    def _families(self, rows, Counter, Gauge):
        service = self.service
        c = service.counters
        worker = str(service.config.hub.worker)
        for name, key, text in (
                ("edge_hub_events_ingested", "events_stored", "Events stored (new) by this worker."),
                ("edge_hub_events_duplicate", "events_duplicate", "Events received again and deduplicated."),
                ("edge_hub_conflicts", "conflicts", "Events whose seq the hub holds with another event id."),
                ("edge_hub_storage_errors", "storage_errors", "Ingest commits that failed (messages redelivered).")):
            family = Counter(name, text, labels=["worker"])
            family.add_metric([worker], c.get(key, 0))
            yield family
        rejected = Counter("edge_hub_rejections", "Batches refused, by reason.", labels=["worker", "reason"])
        for key, n in sorted(c.items()):
            if key.startswith("rejected_"):
                rejected.add_metric([worker, key[len("rejected_"):]], n)
        yield rejected
        up = Gauge("edge_hub_storage_up", "1 when the last scrape could read the stores.", labels=["worker"])
        up.add_metric([worker], 0 if rows is None else 1)
        yield up
        if rows is not None:
            lag = Gauge("edge_hub_ack_lag_events", "Per store: highest seq seen minus the committed ack.",
                        labels=["store_id"])
            acked = Gauge("edge_hub_acked_seq", "Per store: the committed ack.", labels=["store_id"])
            for line in store_lines(rows, service.store_ids):
                lag.add_metric([line["store_id"]], line["backlog_estimate"])
                acked.add_metric([line["store_id"]], line["acked_seq"])
            yield lag
            yield acked
        publisher = getattr(service, "publisher", None)
        leader = getattr(publisher, "leader", None)
        is_leader = Gauge("edge_hub_is_leader", "1 when this worker publishes the snapshots.", labels=["worker"])
        is_leader.add_metric([worker], 1 if leader is None or getattr(leader, "is_leader", False) else 0)
        yield is_leader
        last = getattr(publisher, "last", None) or {}
        age = Gauge("edge_hub_snapshot_age_seconds",
                    "Seconds since this worker last published a store's availability snapshot (-1: never).",
                    labels=["worker"])
        newest = max((s.generated_at_ms for s in last.values()), default=None)
        age.add_metric([worker], -1 if newest is None else max(0.0, time.time() - newest / 1000))
        yield age
