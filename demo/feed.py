"""A warehouse feed for the demo: publishes online availability (`P/warehouses/{id}/stock`).

A real feed is a warehouse system's job; this one publishes the whole list retained at
start and a new version every `interval_s` with a few figures changed.
"""

from __future__ import annotations

import asyncio
import logging
import random

from sync import protocol
from sync.mqtt import MqttClient, MqttError

log = logging.getLogger("demo.feed")


class WarehouseFeed:
    """Publish one warehouse's stock list; `run()` until cancelled."""

    def __init__(self, warehouse_id: str, skus: list[str], *, port: int, prefix: str = "retail",
                 interval_s: float = 10.0, seed: int = 11):
        self.warehouse_id = warehouse_id
        self.topic = protocol.warehouse_stock_topic(prefix, warehouse_id)
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.stock = {sku: self.rng.choice((0, 0, 3, 12, 40, 120, 500)) for sku in skus}
        self.version = 0
        self.client = MqttClient(host="127.0.0.1", port=port, client_id=f"demo-feed-{warehouse_id}",
                                 reconnect_min_s=0.2, reconnect_max_s=2.0)

    def _next(self) -> bytes:
        self.version += 1
        for sku in self.rng.sample(sorted(self.stock), k=min(10, len(self.stock))):
            self.stock[sku] = max(0, self.stock[sku] + self.rng.randint(-8, 20))
        items = [protocol.WarehouseItem(sku=sku, available=n) for sku, n in sorted(self.stock.items())]
        return protocol.encode(protocol.WarehouseStock(warehouse_id=self.warehouse_id,
                                                       version=self.version, items=items))

    async def run(self) -> None:
        await self.client.start()
        try:
            while True:
                try:
                    await asyncio.wait_for(self.client.publish(self.topic, self._next(), qos=1, retain=True), 10)
                except (MqttError, asyncio.TimeoutError) as exc:
                    log.warning("feed: %s version %d not acknowledged: %s", self.warehouse_id, self.version, exc)
                await asyncio.sleep(self.interval_s)
        finally:
            await self.client.stop()
