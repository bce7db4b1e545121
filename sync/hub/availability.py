"""The hub's availability snapshots, pure: which items each store gets, when to publish, which version.

Nothing here does I/O or reads the clock. Inputs are the central projection (available
by store and SKU), the region of each configured store and the warehouse feeds' online
quantities; outputs are each store's snapshot items and the publish decision.

* The SKUs of a store's snapshot are every SKU known in its region (any store of the
  region has stock history for it) plus every SKU a warehouse feed lists, in SKU order.
* `nearby` lists the region's other stores that know the SKU, with their available
  (0 included: "carried there, sold out" differs from "not carried"), in store order.
* `online` is the sum of the warehouses' available for the SKU, None when none lists it.
* A store's snapshot is published when its items changed since the last publish (by
  digest), or when the last publish is older than the refresh interval, so a quiet
  region's snapshot is not shown as stale by the kiosks.
* `version` only grows: max(previous + 1, generation time in ms). The time term keeps it
  growing even if the hub's database is lost and rebuilt from the stores' events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping

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


def regions_of(stores: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Group (store_id, region) pairs as region -> sorted store ids."""
    out: dict[str, list[str]] = {}
    for store_id, region in stores:
        out.setdefault(region, []).append(store_id)
    return {region: sorted(ids) for region, ids in out.items()}


def region_items(members: list[str], available: Available, online: Mapping[str, int]
                 ) -> dict[str, list[protocol.AvailabilityItem]]:
    """Return store_id -> its snapshot items, for the stores of one region (`members`)."""
    skus: set[str] = set(online)
    for store_id in members:
        skus.update(available.get(store_id, ()))
    out: dict[str, list[protocol.AvailabilityItem]] = {s: [] for s in members}
    empty: Mapping[str, int] = {}
    stocks = [(s, available.get(s, empty)) for s in members]
    for sku in sorted(skus):
        carried = [protocol.NearbyStore(s, stock[sku]) for s, stock in stocks if sku in stock]
        on = online.get(sku)
        for store_id in members:
            nearby = [n for n in carried if n.store_id != store_id]
            out[store_id].append(protocol.AvailabilityItem(sku, nearby, on))
    return out


def items_digest(encoded_items: bytes) -> bytes:
    """Digest of a snapshot's encoded items: equal digests, same content."""
    return hashlib.sha256(encoded_items).digest()


def next_version(previous: Published | None, now_ms: int) -> int:
    """Return the next version for a store: greater than the previous, never below `now_ms`."""
    return max((previous.version + 1) if previous else 1, now_ms)


def due(previous: Published | None, digest: bytes, now_ms: int, refresh_ms: int, force: bool = False) -> bool:
    """Return whether a store's snapshot should be published now (always when `force`)."""
    if force or previous is None or previous.digest != digest:
        return True
    return refresh_ms > 0 and now_ms - previous.generated_at_ms >= refresh_ms


def build(store_id: str, items: list[protocol.AvailabilityItem], previous: Published | None,
          now_ms: int, refresh_ms: int, generated_at: str, force: bool = False) -> Snapshot | None:
    """Return the snapshot to publish for a store, or None when nothing is due.

    `generated_at` is `now_ms` as RFC 3339 (formatted by the caller's clock module).
    """
    encoded_items = protocol.encode(items)
    digest = items_digest(encoded_items)
    if not due(previous, digest, now_ms, refresh_ms, force):
        return None
    version = next_version(previous, now_ms)
    head = b'{"v":1,"store_id":"%s","version":%d,"generated_at":"%s","items":' % (
        store_id.encode(), version, generated_at.encode())
    return Snapshot(store_id, version, digest, now_ms, head + encoded_items + b"}", len(items))


def online_of(feeds: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Sum the warehouses' available per SKU (warehouse_id -> sku -> available)."""
    total: dict[str, int] = {}
    for stock in feeds.values():
        for sku, qty in stock.items():
            total[sku] = total.get(sku, 0) + qty
    return total
