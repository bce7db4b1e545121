"""Build the due snapshots from one read transaction of the hub's database (runs off the loop).

`compute(plan, previous, force, now)` opens its own read-only connection (SQLite: the
file read-only; PostgreSQL, `plan.url`: a connection of its own in a REPEATABLE READ READ
ONLY transaction, so the view is one snapshot on either engine), reads the stock
projection, the configured sources' lists, the open orders' claims, the caps with each
capped store's use this period and the chain caps' allowance history, all in one
transaction, then builds every store's items and the snapshot's sources table
(sync/hub/availability.py) and the chain-cap split (sync/hub/caps.py), both pure, and
returns the snapshots that are due.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Mapping

import msgspec

from common import clock
from common.sqlite import open_readonly
from sync import protocol
from sync.hub import availability as av
from sync.hub import captables, feeds, projection, sqlcompat
from sync.hub import caps as capcore


@dataclass(frozen=True)
class Plan:
    """What stays the same between runs: the database, regions, stores' zones and the sources.

    `url`: a PostgreSQL URL (the hub's `storage.url`); empty: the SQLite file `db_path`.
    """

    db_path: Path | None
    regions: dict[str, list[str]]
    zones: Mapping[str, tzinfo]
    sources: list[av.Source] = field(default_factory=list)
    url: str = ""

    def open_read(self):
        if self.url:
            return sqlcompat.connect(self.url, "edge-hub-compute")
        return open_readonly(self.db_path, f"no hub database at {self.db_path}")

    @property
    def stores(self) -> list[str]:
        return sorted(self.zones)


def compute(plan: Plan, previous: Mapping[str, av.Published], force: set[str], now: float,
            refresh_ms: int, confirmed: Mapping[str, int] | None = None) -> list[av.Snapshot]:
    """Return the due snapshots (see the module docstring). `confirmed`: store -> snapshot version it holds."""
    now_ms = int(now * 1000)
    conn = plan.open_read()
    try:
        conn.execute(sqlcompat.read_transaction(conn))  # one consistent view of stock, feeds, orders and caps
        available = projection.available_by_store(conn)
        stock, updated_ms = feeds.source_stock(conn, [s.source_id for s in plan.sources])
        claims = feeds.open_claims(conn)
        capped = captables.effective_caps(conn)
        cap_items, grants = allowances(conn, plan, {sku: cap for sku, (cap, _) in capped.items()},
                                       now, confirmed or {})
        conn.execute("COMMIT")
    finally:
        conn.close()
    updated = {sid: (ms, clock.rfc3339(ms / 1000)) for sid, ms in updated_ms.items()}
    figures, online = av.source_figures(plan.sources, stock, updated, claims, now_ms)
    table = av.source_table(plan.sources, updated, now_ms)
    encoded = {sku: msgspec.Raw(protocol.encode(rows)) for sku, rows in figures.items()}
    generated_at = clock.rfc3339(now)
    out = []
    for members in plan.regions.values():
        for store_id, items in av.region_items(members, available, online, encoded, cap_items).items():
            snap = av.build(store_id, items, previous.get(store_id), now_ms, refresh_ms, generated_at,
                            force=store_id in force, grants=grants.get(store_id), table=table)
            if snap is not None:
                out.append(snap)
    return out


def allowances(conn: sqlite3.Connection, plan: Plan, caps: Mapping[str, capcore.Cap], now: float,
               confirmed: Mapping[str, int]) -> tuple[dict[str, dict[str, protocol.CapAllowance]],
                                                       dict[str, dict[str, int]]]:
    """Return (store -> sku -> its cap in the snapshot, store -> sku -> chain allowance that changed)."""
    stores = plan.stores
    history = captables.grant_history(conn, [sku for sku, cap in caps.items() if cap.scope == "chain"])
    out: dict[str, dict[str, protocol.CapAllowance]] = {s: {} for s in stores}
    changed: dict[str, dict[str, int]] = {}
    for sku, cap in caps.items():
        bounds = {s: capcore.period_bounds(cap.period, now, plan.zones[s]) for s in stores}
        if cap.scope == "chain":
            held = history.get(sku, {})
            used = {}
            for s in stores:
                days = capcore.period_days(cap.period, now, plan.zones[s])
                used[s] = captables.used(conn, s, sku, *days)
            in_force = {s: capcore.in_force_after(held.get(s, []), confirmed.get(s)) for s in stores}
            allowance = capcore.split(cap.limit, stores, in_force, used)
            for s in stores:
                last = held.get(s, [])
                if not last or last[-1][1] != allowance[s]:
                    changed.setdefault(s, {})[sku] = allowance[s]
        else:
            allowance = {s: cap.limit for s in stores if cap.applies_to(s)}
        for s, value in allowance.items():
            start, end = bounds[s]
            out[s][sku] = protocol.CapAllowance(cap.limit, cap.scope, cap.period, clock.rfc3339(start),
                                                clock.rfc3339(end), value)
    return out, changed
