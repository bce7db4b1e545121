"""The agent's Prometheus metrics, on a registry owned by one running agent.

Each `Metrics` owns its own CollectorRegistry, so two agents in one process (tests)
never share counters and the process-global default registry stays untouched. Other
modules add their metrics on `metrics.registry`:

    self.backlog = Gauge("edge_agent_sync_backlog", "...", registry=metrics.registry)
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import events as ev
from common import clock

# Local API calls are sub-millisecond when healthy; the upper buckets catch fsync stalls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The agent's metrics. `render()` returns the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_appended = Counter(
            "edge_agent_events_appended", "Events appended to the log, by type.",
            ["type"], registry=self.registry)
        self.request_seconds = Histogram(
            "edge_agent_http_request_duration_seconds", "HTTP request latency, by route and method.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refused = Counter(
            "edge_agent_http_refused", "HTTP requests answered with an error, by error code.",
            ["code"], registry=self.registry)
        self.last_seq = Gauge("edge_agent_last_seq", "The log's last seq.", registry=self.registry)
        self.rate_limited = Counter(
            "edge_agent_http_rate_limited", "Writes answered 429, by the limit that refused them (write, auth).",
            ["limit"], registry=self.registry)
        self.connections_open = Gauge(
            "edge_agent_http_connections", "Open HTTP connections to the local API.", registry=self.registry)
        self.connections_closed = Counter(
            "edge_agent_http_connections_closed",
            "HTTP connections the API closed itself, by reason (header_timeout, idle_timeout, evicted, over_capacity).",
            ["reason"], registry=self.registry)
        self.accept_errors = Counter(
            "edge_agent_http_accept_errors", "accept() failures on the API's socket, by errno (EMFILE: out of files).",
            ["errno"], registry=self.registry)
        # Label children are cached: .labels() costs a dict lookup plus a lock per call.
        self._by_type = {t: self.events_appended.labels(t) for t in ev.EVENT_TYPES}
        self._latency: dict[tuple[str, str], Histogram] = {}

    def watch_last_seq(self, read: Callable[[], int]) -> None:
        """Report `read()` as the last-seq gauge at every scrape."""
        self.last_seq.set_function(read)

    def count_events(self, events: Iterable[ev.AnyEvent]) -> None:
        """Count appended events by type (a log commit listener)."""
        for event in events:
            self._by_type[ev.type_of(event)].inc()

    def observe_request(self, route: str, method: str, seconds: float) -> None:
        """Record one request's latency under its route template (never the raw path)."""
        child = self._latency.get((route, method))
        if child is None:
            child = self._latency[(route, method)] = self.request_seconds.labels(route, method)
        child.observe(seconds)

    def count_refusal(self, code: str) -> None:
        self.refused.labels(code).inc()

    def count_rate_limited(self, limit: str) -> None:
        self.rate_limited.labels(limit).inc()

    def watch_connections(self, read: Callable[[], int]) -> None:
        """Report `read()` as the open-connections gauge at every scrape."""
        self.connections_open.set_function(read)

    def count_connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def count_accept_error(self, name: str) -> None:
        self.accept_errors.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SyncCollector:
    """The sync process's figures, read from sync.db at scrape time (`status()`: AgentContext.sync_status)."""

    def __init__(self, status: Callable[[], dict]):
        self._status = status

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._status()
        last_ack = clock.parse_rfc3339(s["last_ack_at"]) if s["last_ack_at"] else 0
        for name, value, text in (
                ("edge_agent_sync_backlog", s["backlog"], "Events not yet acked by the hub."),
                ("edge_agent_sync_acked_seq", s["acked_seq"], "The hub's last ack (the cursor)."),
                ("edge_agent_sync_sent_seq", s["sent_seq"], "The last seq published."),
                ("edge_agent_sync_connected", int(s["connected"]), "1 when the sync process is connected to the broker."),
                ("edge_agent_sync_last_ack_timestamp_seconds", last_ack, "When the last ack arrived (Unix time; 0: never)."),
                ("edge_agent_sync_heartbeat_age_seconds",
                 -1 if s["heartbeat_age_s"] is None else s["heartbeat_age_s"],
                 "Seconds since the sync process last recorded itself alive (-1: never)."),
                ("edge_agent_snapshot_version", s["snapshot_version"] or 0, "Version of the held availability snapshot."),
                ("edge_agent_writes_fenced", int(bool(s.get("writes_fenced"))),
                 "1 while writes are refused until the log holds the hub's history (rehydrate).")):
            yield GaugeMetricFamily(name, text, value=value)
        counters = s["counters"]
        for name, value, text in (
                ("edge_agent_sync_reconnects", s["reconnects"], "Reconnects to the broker."),
                ("edge_agent_sync_resends", s["resends"], "Resends after an ack timeout."),
                ("edge_agent_sync_rewinds", s["rewinds"], "Acks below the cursor (cursor rewound)."),
                ("edge_agent_sync_ack_alarms", s["ack_alarms"], "Acks above the log's end (ignored)."),
                ("edge_agent_sync_events_sent", s["events_sent"], "Events published (resends included)."),
                ("edge_agent_sync_stale_acks", counters.get("stale_acks", 0),
                 "Acks ignored as stale: the hub's epoch held, a lower rev (crossed in flight)."),
                ("edge_agent_sync_restarts", s.get("sync_restarts", 0), "Times the agent restarted its sync process."),
                ("edge_agent_snapshots_applied", counters.get("snapshots_applied", 0), "Availability snapshots applied."),
                ("edge_agent_snapshots_ignored", counters.get("snapshots_ignored", 0),
                 "Availability snapshots ignored: version not newer than the held one.")):
            yield CounterMetricFamily(name, text, value=value)
        alarm = GaugeMetricFamily("edge_agent_sync_alarm",
                                  "1 for the sync alarm that holds, by code (none: no alarm).", labels=["code"])
        if s.get("alarm"):
            alarm.add_metric([s["alarm"]["code"]], 1)
        yield alarm
        dropped = CounterMetricFamily("edge_agent_downlink_dropped", "Downlink messages dropped as malformed, by reason.",
                                      labels=["reason"])
        for key, value in sorted(counters.items()):
            if key.startswith("dropped_"):
                dropped.add_metric([key[len("dropped_"):]], value)
        yield dropped
