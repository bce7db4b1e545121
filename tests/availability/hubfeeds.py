"""Helpers for the hub feed tests: a real `edge-hub run`, a publisher and a snapshot reader."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid

from sync import protocol
from tests.sync.helpers import mqtt_client
from tests.sync.hubproc import HubProcess, hub_command

PREFIX = "retail"


def source_toml(source_id: str, kind: str, name: str = "", lead_time_s: int = 0, stale_after_s: int = 3600) -> str:
    return (f'[[sources]]\nid = "{source_id}"\nkind = "{kind}"\nname = "{name or source_id}"\n'
            f"lead_time_s = {lead_time_s}\nstale_after_s = {stale_after_s}\n")


def feed_hub(tmp_path, broker, *sources: str, stores=("store-a", "store-b"), extra: str = "",
             zones: dict[str, str] | None = None) -> HubProcess:
    """A hub publishing every 0.2 s (refresh 1 h: a republish is a change) with these [[sources]] tables."""
    hub = HubProcess(tmp_path / "hub", broker, stores=stores,
                     extra="[availability]\npublish_interval_s = 0.2\nrefresh_s = 3600\n" + extra + "".join(sources))
    if zones:
        text = hub.config_path.read_text()
        for store_id, zone in zones.items():
            text = text.replace(f'id = "{store_id}"\n', f'id = "{store_id}"\ntimezone = "{zone}"\n')
        hub.config_path.write_text(text)
    return hub


async def publish(broker, topic: str, payload: bytes | dict, retain: bool = True) -> None:
    """Publish one QoS 1 message and wait for the broker's PUBACK."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    client = mqtt_client(broker, f"test-pub-{uuid.uuid4().hex[:8]}")
    await client.start()
    try:
        await client.wait_connected(10)
        await asyncio.wait_for(client.publish(topic, body, qos=1, retain=retain), 10)
    finally:
        await client.stop()


def stock(source_id: str, version: int, **items: int) -> dict:
    return {"v": 1, "source_id": source_id, "version": version,
            "items": [{"sku": sku.replace("_", "-"), "available": n} for sku, n in items.items()]}


class Snapshots:
    """Collects every availability snapshot the hub publishes (plain JSON: no agent asks for zlib)."""

    def __init__(self, broker, stores=("store-a", "store-b")):
        self.got: dict[str, list[dict]] = {s: [] for s in stores}
        self.client = mqtt_client(broker, f"test-snap-{uuid.uuid4().hex[:8]}")
        for store_id in stores:
            self.client.subscribe(protocol.availability_topic(PREFIX, store_id), self._on)

    async def _on(self, message) -> None:
        body = json.loads(message.payload)
        self.got[body["store_id"]].append(body)

    async def __aenter__(self) -> "Snapshots":
        await self.client.start()
        await self.client.wait_subscribed(10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()

    def latest(self, store_id: str) -> dict | None:
        return self.got[store_id][-1] if self.got[store_id] else None

    async def wait(self, store_id: str, check, timeout: float = 30.0, what: str = "a snapshot") -> dict:
        """Return the newest snapshot of the store once `check(items by sku)` is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.latest(store_id)
            if snap is not None and check(items(snap)):
                return snap
            await asyncio.sleep(0.05)
        raise AssertionError(f"{store_id}: no {what} in {timeout}s; last: {self.latest(store_id)}")


def items(snapshot: dict) -> dict[str, dict]:
    """The snapshot's items by SKU, each item's `sources` joined with the snapshot's sources table
    (as the agent answers them: whole entries in the table's order)."""
    table = snapshot.get("sources") or []
    out = {}
    for item in snapshot["items"]:
        if "sources" in item:
            quantities = item["sources"]
            assert isinstance(quantities, dict), item   # the wire shape: source_id -> available
            assert set(quantities) <= {t["source_id"] for t in table}, (item, table)
            item = dict(item, sources=[dict(t, available=quantities[t["source_id"]])
                                       for t in table if t["source_id"] in quantities])
        out[item["sku"]] = item
    return out


def wire_items(snapshot: dict) -> dict[str, dict]:
    """The snapshot's items by SKU exactly as sent."""
    return {i["sku"]: i for i in snapshot["items"]}


def cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*hub_command(), *args, "--config", str(hub.config_path)],
                          capture_output=True, text=True, timeout=60)


async def wait_rejected(hub: HubProcess, reason: str, count: int, timeout: float = 20.0) -> dict:
    """Wait until `edge-hub stats` counts `count` refusals for `reason`; return the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = hub.stats()
        if stats["rejected"].get(reason, 0) >= count or time.monotonic() > deadline:
            assert stats["rejected"].get(reason, 0) == count, stats
            return stats
        await asyncio.sleep(0.1)
