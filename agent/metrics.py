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

    def render(self) -> bytes:
        return generate_latest(self.registry)
