"""The hub's availability snapshots, pure: which items each store gets, when to publish, which version.

Nothing here does I/O or reads the clock. Inputs are the central projection (available
by store and SKU), the region of each configured store and the warehouse feeds' online
quantities; outputs are each store's snapshot items and the publish decision.

* The SKUs of a store's snapshot are every SKU known in its region (any store of the
  region has stock history for it) plus every SKU a warehouse feed lists, in SKU order.
* `nearby` lists the region's other stores that know the SKU, with their available
  (0 included: "carried there, sold out" differs from "not carried"), in store order.
* `online` is the sum of the warehouses' available for the SKU, None when none lists it.
* The configured sources' metadata (name, kind, lead time, `updated_at`, stale) is one
  table per snapshot (`source_table`); an item carries only each source's quantity.
* A store's snapshot is published when its items changed since the last publish (by
  digest), or when the last publish is older than the refresh interval, so a quiet
  region's snapshot is not shown as stale by the kiosks.
* `version` only grows: max(previous + 1, generation time in ms). The time term keeps it
  growing even if the hub's database is lost and rebuilt from the stores' events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import msgspec

from sync import protocol

# store_id -> sku -> available
Available = Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class Published:
    """What was last published for a store (persisted by the hub)."""

    version: int
    digest: bytes
    generated_at_ms: int


@dataclass(frozen=True)
class Snapshot:
    """A snapshot ready to publish: the payload and what to persist once it is out."""

    store_id: str
    version: int
    digest: bytes
    generated_at_ms: int
    payload: bytes
    items: int
    grants: Mapping[str, int] = field(default_factory=dict)   # sku -> chain-cap allowance changed in it


def regions_of(stores: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Group (store_id, region) pairs as region -> sorted store ids."""
    out: dict[str, list[str]] = {}
    for store_id, region in stores:
        out.setdefault(region, []).append(store_id)
    return {region: sorted(ids) for region, ids in out.items()}


def region_items(members: list[str], available: Available, online: Mapping[str, int | None],
                 sources: Mapping[str, Mapping[str, int] | msgspec.Raw] | None = None,
                 caps: Mapping[str, Mapping[str, protocol.CapAllowance]] | None = None,
                 ) -> dict[str, list[protocol.AvailabilityItem]]:
    """Return store_id -> its snapshot items, for the stores of one region (`members`).

    `sources`: sku -> source_id -> available, what every store of the region gets for it
    (`source_figures`, or its JSON as msgspec.Raw, encoded once); `caps`: store_id -> sku -> that store's cap. A SKU with a cap for
    one of the region's stores is listed for all of them.
    """
    sources = sources or {}
    caps = caps or {}
    skus: set[str] = set(online) | set(sources)
    for store_id in members:
        skus.update(available.get(store_id, ()))
        skus.update(caps.get(store_id, ()))
    out: dict[str, list[protocol.AvailabilityItem]] = {s: [] for s in members}
    empty: Mapping[str, int] = {}
    stocks = [(s, available.get(s, empty)) for s in members]
    store_caps = [(s, caps.get(s, empty)) for s in members]
    unset = msgspec.UNSET
    for sku in sorted(skus):
        carried = [protocol.NearbyStore(s, stock[sku]) for s, stock in stocks if sku in stock]
        on = online.get(sku)
        figures = sources.get(sku, unset)
        for store_id, held in store_caps:
            nearby = [n for n in carried if n.store_id != store_id]
            cap = held.get(sku, unset)
            if figures is unset and cap is unset:
                out[store_id].append(protocol.AvailabilityItem(sku, nearby, on))
            else:
                out[store_id].append(protocol.StoreItem(sku, nearby, on, figures, cap))
    return out


@dataclass(frozen=True)
class Source:
    """A configured source as the snapshot shows it (`[[sources]]`)."""

    source_id: str
    name: str
    kind: str
    lead_time_s: int
    stale_after_s: int


def source_table(sources: list[Source], updated: Mapping[str, tuple[int, str]],
                 now_ms: int) -> list[protocol.SnapshotSource]:
    """Return the snapshot's `sources` table: each configured source heard from, in config order.

    `updated`: source_id -> (ms, RFC 3339) of the last accepted message. A source is stale
    when `now_ms - updated` exceeds its `stale_after_s`.
    """
    out = []
    for src in sources:
        if src.source_id in updated:
            at_ms, at_text = updated[src.source_id]
            out.append(protocol.SnapshotSource(src.source_id, src.name, src.kind, src.lead_time_s, at_text,
                                               now_ms - at_ms > src.stale_after_s * 1000, src.stale_after_s))
    return out


def source_figures(sources: list[Source], stock: Mapping[str, Mapping[str, int]],
                   updated: Mapping[str, tuple[int, str]], claims: Mapping[str, Mapping[str, int]],
                   now_ms: int) -> tuple[dict[str, dict[str, int]], dict[str, int | None]]:
    """Return (sku -> source_id -> available, sku -> online) for the configured `sources`, in their order.

    `stock`: source_id -> sku -> available as last fed; `updated`: source_id -> (ms, RFC
    3339) of the last accepted message (a source never heard from lists nothing);
    `claims`: source_id (or "online") -> sku -> qty of open orders. Rules:

    * a source is stale when `now_ms - updated` exceeds its `stale_after_s`;
    * each figure is net of the open orders claimed against that source, never below 0;
    * an order claimed "online" is taken from the fresh warehouse sources in config
      order, so the per-warehouse figures and `online` agree;
    * `online` is the sum of the fresh warehouses' net figures, None when no fresh
      warehouse lists the SKU (a stale figure is shown, not counted).
    """
    figures: dict[str, dict[str, int]] = {}
    online: dict[str, int | None] = {}
    warehouses: dict[str, list[str]] = {}     # sku -> the fresh warehouses listing it, in config order
    no_claims: Mapping[str, int] = {}
    for src in sources:
        if src.source_id not in updated:
            continue
        stale = now_ms - updated[src.source_id][0] > src.stale_after_s * 1000
        fresh_warehouse = src.kind == "warehouse" and not stale
        claimed = claims.get(src.source_id, no_claims)
        source_id = src.source_id
        for sku, qty in stock.get(source_id, no_claims).items():
            row = figures.get(sku)
            if row is None:
                row = figures[sku] = {}
            row[source_id] = max(0, qty - claimed.get(sku, 0))
            if fresh_warehouse:
                warehouses.setdefault(sku, []).append(source_id)
    online_claims = claims.get(protocol.ONLINE, no_claims)
    for sku, ids in warehouses.items():
        row = figures[sku]
        left = online_claims.get(sku, 0)
        for source_id in ids:
            if left <= 0:
                break
            take = min(left, row[source_id])
            row[source_id] -= take
            left -= take
        online[sku] = sum(row[source_id] for source_id in ids)
    for sku in figures:
        online.setdefault(sku, None)
    return figures, online


def items_digest(encoded_items: bytes, table: list[protocol.SnapshotSource] | None = None) -> bytes:
    """Digest of a snapshot's content: its encoded items and its sources table but `updated_at`.

    Equal digests, same content. A source's `updated_at` alone moving (a new list with
    the same figures) leaves it equal, so it is carried at the next publish that is due
    anyway (a changed figure, a stale transition, `refresh_s`), not by a republish of
    every store. Without a table the digest is the items' alone, as before the table.
    """
    h = hashlib.sha256(encoded_items)
    if table:
        h.update(b"\n" + protocol.encode([[s.source_id, s.name, s.kind, s.lead_time_s, s.stale, s.stale_after_s]
                                           for s in table]))
    return h.digest()


def next_version(previous: Published | None, now_ms: int) -> int:
    """Return the next version for a store: greater than the previous, never below `now_ms`."""
    return max((previous.version + 1) if previous else 1, now_ms)


def due(previous: Published | None, digest: bytes, now_ms: int, refresh_ms: int, force: bool = False) -> bool:
    """Return whether a store's snapshot should be published now (always when `force`)."""
    if force or previous is None or previous.digest != digest:
        return True
    return refresh_ms > 0 and now_ms - previous.generated_at_ms >= refresh_ms


def build(store_id: str, items: list[protocol.AvailabilityItem], previous: Published | None,
          now_ms: int, refresh_ms: int, generated_at: str, force: bool = False,
          grants: Mapping[str, int] | None = None,
          table: list[protocol.SnapshotSource] | None = None) -> Snapshot | None:
    """Return the snapshot to publish for a store, or None when nothing is due.

    `generated_at` is `now_ms` as RFC 3339 (formatted by the caller's clock module);
    `table` is the snapshot's `sources` table (`source_table`), left out when empty.
    """
    encoded_items = protocol.encode(items)
    digest = items_digest(encoded_items, table)
    if not due(previous, digest, now_ms, refresh_ms, force):
        return None
    version = next_version(previous, now_ms)
    head = b'{"v":1,"store_id":"%s","version":%d,"generated_at":"%s",' % (
        store_id.encode(), version, generated_at.encode())
    if table:
        head += b'"sources":%s,' % protocol.encode(table)
    head += b'"items":'
    return Snapshot(store_id, version, digest, now_ms, head + encoded_items + b"}", len(items), dict(grants or {}))


def online_of(feeds: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Sum the warehouses' available per SKU (warehouse_id -> sku -> available)."""
    total: dict[str, int] = {}
    for stock in feeds.values():
        for sku, qty in stock.items():
            total[sku] = total.get(sku, 0) + qty
    return total
