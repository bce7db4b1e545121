"""Shared helpers for the sync tests: fake events, an ack watcher, polling with deadlines."""

from __future__ import annotations

import asyncio
import json
import time

from sync import protocol
from sync.mqtt import Message, MqttClient

STORE = "store-0042"
PREFIX = "retail"


def body(seq: int, store_id: str = STORE, event_id: str | None = None) -> bytes:
    return json.dumps({
        "seq": seq, "event_id": event_id or f"00000000-0000-7000-8000-{seq:012d}", "store_id": store_id,
        "type": "received", "occurred_at": "2026-11-27T10:00:00.000Z",
        "recorded_at": "2026-11-27T10:00:00.000Z", "command_id": f"c{seq}", "schema": 1,
        "sku": "A1", "qty": 1, "location": "backroom"}, separators=(",", ":")).encode()


def batch(first: int, last: int, store_id: str = STORE, **kw) -> bytes:
    return protocol.encode_batch(store_id, first, last, [body(s, store_id, **kw) for s in range(first, last + 1)])


def mqtt_client(broker, client_id: str, **kw) -> MqttClient:
    return MqttClient(host=broker.host, port=broker.port, client_id=client_id,
                      reconnect_min_s=0.05, reconnect_max_s=0.3, **kw)


async def eventually(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.02):
    """Poll `predicate` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """The synchronous `eventually`, for tests that drive processes; the failure shows the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(interval)


class AckWatcher:
    """Subscribes to a store's ack topic and records every acked_seq received."""

    def __init__(self, broker, store_id: str = STORE, client_id: str = "test-ack-watcher",
                 retained: bool = True):
        self.retained = retained
        self.seen: list[int] = []
        self.client = mqtt_client(broker, client_id)
        self.client.subscribe(protocol.ack_topic(PREFIX, store_id), self._on_ack)

    async def _on_ack(self, message: Message) -> None:
        self.seen.append(protocol.decode(message.payload, protocol.Ack).acked_seq)

    @property
    def last(self) -> int | None:
        return self.seen[-1] if self.seen else None

    async def __aenter__(self) -> "AckWatcher":
        await self.client.start()
        await self.client.wait_subscribed(10)
        if self.retained:  # the hub states every ack on connect, so one is retained already
            await eventually(lambda: self.seen, what="the retained ack")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()


class FakeHub:
    """Records every batch (first, last) of STORE in arrival order; acks when told, or at once with `auto`.

    `async with FakeHub(broker) as hub` connects and waits for the subscription.
    """

    def __init__(self, broker, auto: bool = False, client_id: str = "fake-hub"):
        self.batches: list[tuple[int, int]] = []
        self.seqs: list[int] = []
        self.auto = auto
        self.client = mqtt_client(broker, client_id)
        self.client.subscribe(protocol.events_topic(PREFIX, STORE), self._on_batch)

    async def __aenter__(self) -> "FakeHub":
        await self.client.start()
        await self.client.wait_subscribed(10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.stop()

    async def _on_batch(self, message: Message) -> None:
        batch, events = protocol.decode_batch(message.payload)
        self.batches.append((batch.first_seq, batch.last_seq))
        self.seqs += [head.seq for head, _ in events]
        if self.auto:
            await self.ack(self.contiguous())

    def contiguous(self) -> int:
        held, top = set(self.seqs), 0
        while top + 1 in held:
            top += 1
        return top

    async def ack(self, seq: int, epoch: str | None = None, rev: int | None = None) -> None:
        """Publish a retained ack; `epoch`/`rev` give it a hub worker's mark."""
        payload = protocol.encode(protocol.Ack(store_id=STORE, acked_seq=seq, epoch=epoch, rev=rev))
        await asyncio.wait_for(self.client.publish(protocol.ack_topic(PREFIX, STORE), payload, retain=True), 5)

