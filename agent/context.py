"""What the agent's handlers and scheduled jobs share: built once by the composition root."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.caps import cap_window
from common import clock

from agent.disk import DiskGuard
from agent.metrics import Metrics
from agent.ports import EventLog, LogQueries, SyncView
from agent.settings import AgentConfig
from agent.supervisor import SyncSupervisor
from common.notify import Notifier


@dataclass
class AgentContext:
    """The agent's parts. `supervisor` is None when this process does not run sync itself."""

    config: AgentConfig
    log: EventLog
    queries: LogQueries
    sync: SyncView
    metrics: Metrics
    disk: DiskGuard | None = None
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    supervisor: SyncSupervisor | None = None
    ready: bool = False
    api_addresses: list[tuple[str, int]] = field(default_factory=list)
    rehydrator: Any = None   # agent.rehydrate.Rehydrator: fences writes while the log lacks the hub's history
    clock: Callable[[], float] = time.time   # the agent's clock, Unix seconds (the log's `now` reads it too)

    def now(self) -> str:
        """Return the agent's time as RFC 3339 UTC (what the log stamps as recorded_at)."""
        return clock.rfc3339(self.clock())

    def availability(self, sku: str) -> dict:
        """The GET /v1/availability/{sku} answer (docs/availability.md, agent side).

        `here` is the log's projection; nearby, online, sources and cap the held snapshot's.
        Each source's `age_s` is measured from its `updated_at` to this clock; it is
        `stale` when the hub said so or when age_s passes the source's `stale_after_s`.
        The cap's period is the one containing now (rolled by whole periods past
        `period_end`); `used` is this store's usage in it, counted from the log.
        """
        row = self.queries.stock(sku)
        here = ({"floor": row["floor"], "backroom": row["backroom"], "reserved": row["reserved"],
                 "available": row["available"]} if row is not None
                else {"floor": 0, "backroom": 0, "reserved": 0, "available": 0})
        item = self.sync.item(sku)
        now_s = self.clock()
        answer = {"sku": sku, "here": here, "nearby": item["nearby"], "online": item["online"],
                  "snapshot": item["snapshot"], "sources": [_source(s, now_s) for s in item["sources"]],
                  "cap": None}
        cap = item["cap"]
        if cap is not None:
            window = cap_window(cap, clock.rfc3339(now_s))
            used = self.queries.cap_used(sku, window.first_slot, window.end_slot)
            answer["cap"] = {"limit": cap.limit, "scope": cap.scope, "period": cap.period,
                             "period_start": window.start, "period_end": window.end,
                             "allowance": cap.allowance, "used": used, "left": max(0, cap.allowance - used)}
        return answer

    @property
    def api_url(self) -> str:
        """The API's base URL, e.g. http://127.0.0.1:8080 (valid once serving)."""
        host, port = self.api_addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def sync_status(self) -> dict:
        """The GET /v1/sync answer: the contract's keys first, then the sync process's diagnostics.

        `connected` is the sync process's last word, and false once its heartbeat is older
        than three intervals (a dead or frozen sync says nothing). `alarm` is
        {code, message, since} or None: the link's alarm (a TLS or credentials problem the
        sync process named, see `link_alarm`) before an ack above the log's end
        (code `ack_above_log`, the uplink's text).
        """
        last_seq = self.log.last_seq
        s = self.sync.status()
        fresh = s["beat_age_s"] is not None and s["beat_age_s"] <= 3 * self.config.sync.heartbeat_s
        meta = self.sync.snapshot_meta()
        answer = {
            "last_seq": last_seq, "acked_seq": s["acked_seq"], "backlog": max(0, last_seq - s["acked_seq"]),
            "connected": bool(s["connected"] and fresh), "last_ack_at": s["last_ack_at"],
            "snapshot_version": meta["version"] if meta else None,
            "enabled": self.config.sync.enabled,
            "sent_seq": s["sent_seq"], "inflight_batches": s["inflight_batches"], "reconnects": s["reconnects"],
            "resends": s["resends"], "rewinds": s["rewinds"], "ack_alarms": s["ack_alarms"],
            "alarm": self._alarm(s),
            "events_sent": s["events_sent"], "heartbeat_age_s": s["beat_age_s"], "sync_pid": s["pid"],
            "counters": s["counters"],
        }
        if self.supervisor is not None:
            answer["sync_restarts"] = self.supervisor.restarts
            answer["sync_stalls"] = self.supervisor.stalls
        if self.rehydrator is not None:   # agent/rehydrate.py: why writes are refused now, if they are
            fence = self.rehydrator.fence()
            answer["writes_fenced"] = {"code": fence.code, "message": fence.message} if fence else None
            answer["hub_acked_seq"] = self.rehydrator.hub[0] if self.rehydrator.hub else None
            answer["rehydrated_events"] = self.rehydrator.appended
        return answer

    def link_alarm(self) -> dict | None:
        """The sync process's link alarm ({code, message, since}) while it holds; None without sync."""
        if not self.config.sync.enabled:
            return None
        return self.sync.status().get("link_alarm")

    def _alarm(self, s: dict) -> dict | None:
        link = s.get("link_alarm") if self.config.sync.enabled else None
        if link is not None:
            return link
        if s["alarm"]:
            return {"code": "ack_above_log", "message": s["alarm"], "since": None}
        return None


def _source(source: dict, now_s: float) -> dict:
    try:
        age = round(max(0.0, now_s - clock.parse_rfc3339(source["updated_at"])), 3)
    except ValueError:
        age = None
    limit = source.get("stale_after_s")
    stale = bool(source["stale"]) or age is None or (limit is not None and age > limit)
    return dict(source, age_s=age, stale=stale)
