"""Hub workers share the ingest through `$share/{group}/P/stores/+/events` on a real mosquitto.

mosquitto 2.0.11 accepts the shared filter over MQTT 5 and 3.1.1 and hands each message
to one member (round robin). The client routes a message on `P/stores/x/events` to the
handler of the shared filter it subscribed, and each worker's client id and session
expiry come from the hub's settings.
"""

import asyncio

import pytest

from sync import protocol
from common.config import MqttSection
from sync.hub.settings import HubSection
from sync.mqtt import Message, MqttClient
from tests.sync.helpers import PREFIX, eventually, mqtt_client

N = 40


@pytest.mark.parametrize("version", [5, 4])
async def test_a_shared_subscription_splits_the_ingest_between_workers(broker, version):
    section = HubSection(workers_shared=True, share_group="hubs")
    shared = section.events_filter(PREFIX)
    assert shared == f"$share/hubs/{PREFIX}/stores/+/events"
    got: dict[str, list[str]] = {"w1": [], "w2": []}

    def handler(name: str):
        async def on(message: Message) -> None:
            got[name].append(message.payload.decode())
        return on

    workers = []
    for name in got:
        client = mqtt_client(broker, f"edge-hub-hub-1-{name}", protocol=version)
        client.subscribe(shared, handler(name), concurrent=True)
        workers.append(client)
    publisher = mqtt_client(broker, "store-pub", protocol=version)
    try:
        for client in (*workers, publisher):
            await client.start()
        for client in workers:
            await client.wait_subscribed(10)
        await publisher.wait_connected(10)
        for i in range(N):
            await asyncio.wait_for(publisher.publish(protocol.events_topic(PREFIX, f"store-{i % 4:04d}"),
                                                     str(i).encode(), qos=1), 5)
        await eventually(lambda: len(got["w1"]) + len(got["w2"]) >= N, what="every message at a worker")
        await asyncio.sleep(0.3)   # a duplicate delivery would show here
        everything = got["w1"] + got["w2"]
        assert sorted(everything, key=int) == [str(i) for i in range(N)]   # each exactly once
        assert got["w1"] and got["w2"]                                      # both took a share
    finally:
        for client in (*workers, publisher):
            await client.stop()


def test_a_shared_worker_has_its_own_client_id_and_a_short_session():
    single = HubSection()
    assert (single.client_id(), single.events_filter("retail")) == ("edge-hub-hub-1", "retail/stores/+/events")
    worker = HubSection(id="hub-1", worker=2, workers_shared=True)
    assert worker.client_id() == "edge-hub-hub-1-2"
    assert worker.events_filter("retail") == "$share/edge-hub/retail/stores/+/events"
    mqtt = MqttSection()
    assert MqttClient.from_settings(mqtt, worker.client_id(), session_expiry_s=30).session_expiry_s == 30
    assert MqttClient.from_settings(MqttSection(session_expiry_s=90), "x", session_expiry_s=30).session_expiry_s == 90
    assert MqttClient.from_settings(mqtt, "x").session_expiry_s == 7 * 24 * 3600
