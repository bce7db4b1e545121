"""The demo's external feeds: a warehouse, a partner, a supplier, and a sales cap.

A real feed is a warehouse's, partner's or supplier's system; these stand in for them and
publish what the hub documents (docs/protocol.md), each with a client of its own:

* the warehouse on the contract's `P/warehouses/{id}/stock` (retained);
* the partner and the supplier on `P/sources/{id}/stock` (retained), `{"v": 1,
  "source_id", "version", "items": [{"sku", "available"}]}`;
* one cap, retained on `P/caps/{sku}`: `{"v": 1, "sku", "limit", "scope", "period"}`.

Every feed publishes its whole list at start and a new version every `interval_s` with a
few figures changed. The supplier's feed goes quiet for a while in every cycle
(`QUIET`), so its figures turn stale on the kiosks after its `stale_after_s`, then fresh
again: what a feed that stops sending looks like. `SOURCES` is also what the demo writes
into the hub's `[[sources]]`, so the config and the feeds cannot disagree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Callable

from sync import protocol
from sync.mqtt import MqttClient, MqttError

log = logging.getLogger("demo.feed")

# The hub's [[sources]] (docs/availability.md): id, name, kind, lead time, staleness.
SOURCES = [
    {"id": "wh-central", "name": "Central warehouse", "kind": "warehouse",
     "lead_time_s": 86_400, "stale_after_s": 60},
    {"id": "partner-north", "name": "Partner North", "kind": "partner",
     "lead_time_s": 2 * 86_400, "stale_after_s": 60},
    {"id": "supplier-x", "name": "Supplier X", "kind": "supplier",
     "lead_time_s": 3 * 86_400, "stale_after_s": 45},
]
QUIET = {"supplier-x": (120.0, 90.0)}   # (seconds sending, seconds quiet), in a loop
CAP_INDEX = 20        # the capped product: the first beyond the traffic's 20 best sellers
CAP = {"limit": 2, "scope": "store", "period": "week"}


def capped_sku(skus: list[str]) -> str:
    """The SKU the demo caps (the same catalog always gives the same one)."""
    return skus[min(CAP_INDEX, len(skus) - 1)]


def sending(elapsed_s: float, cycle: tuple[float, float] | None) -> bool:
    """Whether a feed with `cycle` (sending, quiet) sends `elapsed_s` after it started."""
    if cycle is None:
        return True
    on, off = cycle
    return elapsed_s % (on + off) < on


def source_stock_topic(prefix: str, source_id: str) -> str:
    return f"{prefix}/sources/{source_id}/stock"


def cap_topic(prefix: str, sku: str) -> str:
    return f"{prefix}/caps/{sku}"


class StockList:
    """One source's figures: all of `skus` or a share of them, moving a little each version."""

    def __init__(self, skus: list[str], *, seed: int, share: float = 1.0, always: tuple[str, ...] = (),
                 choices: tuple[int, ...] = (0, 0, 3, 12, 40, 120, 500)):
        self.rng = random.Random(seed)
        self.stock = {sku: self.rng.choice(choices) for sku in skus
                      if sku in always or self.rng.random() < share}
        for sku in always:
            self.stock[sku] = max(self.stock.get(sku, 0), 12)
        self.version = 0

    def next(self) -> list[tuple[str, int]]:
        self.version += 1
        if self.version > 1:
            for sku in self.rng.sample(sorted(self.stock), k=min(10, len(self.stock))):
                self.stock[sku] = max(0, self.stock[sku] + self.rng.randint(-8, 20))
        return sorted(self.stock.items())


class Feeds:
    """Publish the warehouse, the partner, the supplier and the cap; `run()` until cancelled."""

    def __init__(self, skus: list[str], *, port: int, prefix: str = "retail", interval_s: float = 10.0,
                 quiet: dict[str, tuple[float, float]] | None = None,
                 mqtt_options: Callable[[str], dict] = lambda identity: {}):
        self.prefix = prefix
        self.mqtt_options = mqtt_options   # identity -> extra MqttClient keys (TLS in `--tls`)
        self._clients: dict[str, MqttClient] = {}
        self.port = port
        self.interval_s = interval_s
        self.quiet = QUIET if quiet is None else quiet
        self.capped = capped_sku(skus)
        self.lists = {source["id"]: StockList(skus, seed=11 + i, share=1.0 if i == 0 else 0.6,
                                              always=(self.capped,))
                      for i, source in enumerate(SOURCES)}

    def describe(self) -> list[str]:
        """Lines for the demo's banner."""
        quiet = ", ".join(f"{sid} goes quiet {off:g} s in every {on + off:g} s (stale after "
                          f"{next(s['stale_after_s'] for s in SOURCES if s['id'] == sid)} s)"
                          for sid, (on, off) in self.quiet.items())
        return [f"sources: {', '.join(s['name'] for s in SOURCES)}" + (f"; {quiet}" if quiet else ""),
                f"capped: {self.capped}, limit {CAP['limit']} per {CAP['period']} per store"]

    def _payload(self, source: dict) -> bytes:
        stock = self.lists[source["id"]]
        items = stock.next()
        if source["kind"] == "warehouse":
            return protocol.encode(protocol.WarehouseStock(
                warehouse_id=source["id"], version=stock.version,
                items=[protocol.WarehouseItem(sku=sku, available=n) for sku, n in items]))
        return json.dumps({"v": 1, "source_id": source["id"], "version": stock.version,
                           "items": [{"sku": sku, "available": n} for sku, n in items]},
                          separators=(",", ":")).encode()

    def _topic(self, source: dict) -> str:
        if source["kind"] == "warehouse":
            return protocol.warehouse_stock_topic(self.prefix, source["id"])
        return source_stock_topic(self.prefix, source["id"])

    async def _publish(self, client: MqttClient, topic: str, payload: bytes, what: str) -> None:
        try:
            await asyncio.wait_for(client.publish(topic, payload, qos=1, retain=True), 10)
        except (MqttError, asyncio.TimeoutError) as exc:
            log.warning("feed: %s not acknowledged: %s", what, exc)

    def _client(self, identity: str) -> MqttClient:
        """One connection per identity: brokers that own sessions by identity
        (`use_username_as_clientid`, config/mosquitto-tls.conf) would let two clients of one
        identity take each other's session over, again and again."""
        if identity not in self._clients:
            self._clients[identity] = MqttClient(host="127.0.0.1", port=self.port, client_id=f"demo-{identity}",
                                                 reconnect_min_s=0.2, reconnect_max_s=2.0,
                                                 **self.mqtt_options(identity))
        return self._clients[identity]

    async def _run_source(self, source: dict) -> None:
        client = self._client("warehouse-feed" if source["kind"] == "warehouse" else "edge-feed")
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if sending(loop.time() - started, self.quiet.get(source["id"])):
                await self._publish(client, self._topic(source), self._payload(source),
                                    f"{source['id']} version {self.lists[source['id']].version}")
            await asyncio.sleep(self.interval_s)

    async def _set_cap(self) -> None:
        payload = json.dumps({"v": 1, "sku": self.capped, **CAP}, separators=(",", ":")).encode()
        await self._publish(self._client("edge-feed"), cap_topic(self.prefix, self.capped), payload,
                            f"the cap on {self.capped}")

    async def run(self) -> None:
        identities = {"warehouse-feed" if source["kind"] == "warehouse" else "edge-feed" for source in SOURCES}
        for identity in sorted(identities | {"edge-feed"}):
            await self._client(identity).start()
        tasks = [asyncio.create_task(self._run_source(source), name=f"feed-{source['id']}") for source in SOURCES]
        tasks.append(asyncio.create_task(self._set_cap(), name="feed-caps"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in self._clients.values():
                await client.stop()
