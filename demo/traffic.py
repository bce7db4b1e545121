"""Simulated store traffic through the agents' real HTTP API: sales, deliveries, moves,
counts and reservations, at a configurable rate (commands per second, all stores together).

The simulator is a client like a POS or a scanner: it only POSTs to /v1/events and
reads /v1/stock; refusals (an over-reservation, a sale past the sales cap) are normal
traffic and are counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("demo.traffic")


@dataclass
class StoreClient:
    store_id: str
    url: str
    open_reservations: list[tuple[str, str]] = field(default_factory=list)   # (reservation_id, sku)


@dataclass
class TrafficStats:
    commands: int = 0
    events: int = 0
    refused: int = 0
    capped: int = 0      # refused 409 sales_cap_reached (the demo caps one product)
    failed: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Traffic:
    """Drives the stores' APIs; `run()` until cancelled. `stats` says what was sent."""

    def __init__(self, stores: list[StoreClient], skus: list[str], rate: float, seed: int | None = None):
        self.stores = stores
        self.skus = skus
        self.rate = rate
        self.rng = random.Random(seed)
        self.stats = TrafficStats()
        self._session: aiohttp.ClientSession | None = None

    async def stock_up(self, session: aiohttp.ClientSession) -> None:
        """Give every store opening stock for every product (idempotent by command_id)."""
        for store in self.stores:
            rng = random.Random(f"{store.store_id}-opening")
            events = []
            for sku in self.skus:
                events.append({"type": "received", "sku": sku, "qty": rng.randint(2, 30), "location": "backroom"})
                events.append({"type": "received", "sku": sku, "qty": rng.randint(1, 12), "location": "floor"})
            for start in range(0, len(events), 1000):
                await self._post(session, store, f"opening-{store.store_id}-{start}", events[start:start + 1000])

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await self.stock_up(session)
            interval = 1.0 / self.rate if self.rate > 0 else None
            next_at = time.monotonic()
            while True:
                if interval is None:
                    await asyncio.sleep(3600)
                    continue
                next_at += interval
                await self.step(session)
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    next_at = time.monotonic()   # running late: do not burst to catch up

    def _sku(self) -> str:
        # A few best sellers and a long tail, like a real store.
        if self.rng.random() < 0.5:
            return self.rng.choice(self.skus[:20])
        return self.rng.choice(self.skus)

    async def step(self, session: aiohttp.ClientSession) -> None:
        """Send one random command to one random store."""
        store = self.rng.choice(self.stores)
        sku = self._sku()
        roll = self.rng.random()
        if roll < 0.50:
            events = [{"type": "sold", "sku": sku, "qty": self.rng.choice((1, 1, 1, 2, 3))}]
        elif roll < 0.60:
            events = [{"type": "received", "sku": s, "qty": self.rng.randint(6, 24), "ref": f"PO-{self.rng.randint(1000, 9999)}"}
                      for s in {self._sku() for _ in range(self.rng.randint(2, 6))}]
        elif roll < 0.72:
            events = [{"type": "moved", "sku": sku, "qty": self.rng.randint(1, 6), "from": "backroom", "to": "floor"}]
        elif roll < 0.77:
            row = await self._stock(session, store, sku)
            floor = row["floor"] if row else 0
            events = [{"type": "counted", "sku": sku, "location": "floor",
                       "counted": max(0, floor + self.rng.choice((0, 0, -1, 1)))}]
        elif roll < 0.80:
            events = [{"type": "returned", "sku": sku, "qty": 1}]
        elif roll < 0.90 or not store.open_reservations:
            rid = f"R-{uuid.uuid4().hex[:12]}"
            events = [{"type": "reserved", "sku": sku, "qty": self.rng.randint(1, 2), "reservation_id": rid}]
            if await self._post(session, store, str(uuid.uuid4()), events):
                store.open_reservations.append((rid, sku))
            return
        else:
            rid, _ = store.open_reservations.pop(self.rng.randrange(len(store.open_reservations)))
            kind = self.rng.choice(("reservation_released", "reservation_fulfilled"))
            events = [{"type": kind, "reservation_id": rid}]
        await self._post(session, store, str(uuid.uuid4()), events)

    async def _stock(self, session: aiohttp.ClientSession, store: StoreClient, sku: str) -> dict | None:
        try:
            async with session.get(f"{store.url}/v1/stock/{sku}") as resp:
                return await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def _post(self, session: aiohttp.ClientSession, store: StoreClient, command_id: str,
                    events: list[dict]) -> bool:
        """POST one command; return whether the store accepted it (duplicates count as accepted)."""
        try:
            async with session.post(f"{store.url}/v1/events",
                                    json={"command_id": command_id, "events": events}) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.stats.failed += 1
            log.warning("traffic: %s did not answer a command: %s", store.store_id, exc)
            return False
        if status in (200, 201):
            self.stats.commands += 1
            self.stats.events += len(events)
            for event in events:
                self.stats.by_type[event["type"]] = self.stats.by_type.get(event["type"], 0) + 1
            return True
        if status == 409:
            code = body.get("error", {}).get("code") if isinstance(body, dict) else None
            if code == "sales_cap_reached":
                self.stats.capped += 1
            else:
                self.stats.refused += 1
            return False
        self.stats.failed += 1
        log.warning("traffic: %s answered %d to %s: %s", store.store_id, status, events[0]["type"], body)
        return False
