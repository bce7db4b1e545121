"""The shipped ACL through the project's own MQTT client: a denied publish is an MqttError.

The full table of allowed and denied attempts (store A, store B, the hub, a feed; password
and certificate identity; MQTT 5 and 3.1.1) is tests/security/test_acl_table.py; this
checks what the uplink relies on: sync/mqtt.py turns PUBACK 0x87 into MqttError.
"""

import asyncio
import subprocess
from pathlib import Path

import pytest

from sync import protocol
from sync.mqtt import Message, MqttClient, MqttError
from tests.support.broker import Broker
from tests.sync.helpers import PREFIX, batch, eventually

ACL = Path(__file__).resolve().parents[2] / "config" / "acl"


PASSWORD = "acl-test-password"


@pytest.fixture
def acl_broker(tmp_path):
    passwd = tmp_path / "passwd"
    for user in ("edge-hub", "store-0042"):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists() else []), str(passwd),
                        user, PASSWORD], check=True, capture_output=True, timeout=30)
    with Broker(tmp_path / "broker", anonymous=False,
                extra_conf=f"password_file {passwd}\nacl_file {ACL}\n") as running:
        yield running


def user_client(broker, username: str) -> MqttClient:
    return MqttClient(host=broker.host, port=broker.port, client_id=f"acl-{username}", username=username,
                      password=PASSWORD, reconnect_min_s=0.05, reconnect_max_s=0.3)


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
