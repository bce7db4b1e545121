"""The example ACL (config/acl) on a real mosquitto: a store may only publish its own events."""

import asyncio
from pathlib import Path

import pytest

from sync import protocol
from sync.mqtt import Message, MqttClient, MqttError
from tests.support.broker import Broker
from tests.sync.helpers import PREFIX, batch, eventually

ACL = Path(__file__).resolve().parents[2] / "config" / "acl"


@pytest.fixture
def acl_broker(tmp_path):
    with Broker(tmp_path / "broker", extra_conf=f"acl_file {ACL}\n") as running:
        yield running


def user_client(broker, username: str) -> MqttClient:
    return MqttClient(host=broker.host, port=broker.port, client_id=f"acl-{username}", username=username,
                      reconnect_min_s=0.05, reconnect_max_s=0.3)


async def test_store_may_publish_only_its_own_events_and_hub_reads_all(acl_broker):
    got: list[str] = []

    async def on_events(message: Message) -> None:
        got.append(message.topic)

    hub = user_client(acl_broker, "edge-hub")
    hub.subscribe(protocol.all_events_filter(PREFIX), on_events)
    store = user_client(acl_broker, "store-0042")
    await hub.start()
    await store.start()
    try:
        await hub.wait_subscribed(5)
        await store.wait_subscribed(5)
        await asyncio.wait_for(store.publish(protocol.events_topic(PREFIX, "store-0042"), batch(1, 1)), 5)
        with pytest.raises(MqttError, match="refused"):
            await asyncio.wait_for(
                store.publish(protocol.events_topic(PREFIX, "store-0043"), batch(1, 1, "store-0043")), 5)
        with pytest.raises(MqttError, match="refused"):
            await asyncio.wait_for(
                store.publish(protocol.ack_topic(PREFIX, "store-0042"), b"{}", retain=True), 5)
        await eventually(lambda: got, what="the hub to read the store's events")
        await asyncio.wait_for(store.publish(protocol.events_topic(PREFIX, "store-0042"), batch(2, 2)), 5)
        await eventually(lambda: len(got) == 2, what="the second batch")
        assert got == [protocol.events_topic(PREFIX, "store-0042")] * 2
    finally:
        await store.stop()
        await hub.stop()
