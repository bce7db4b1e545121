"""A test client plays the store against a real `edge-hub run` process."""

import asyncio

import pytest

from sync import protocol
from tests.sync.helpers import PREFIX, STORE, AckWatcher, batch, body, eventually, mqtt_client
from tests.sync.hubproc import HubProcess

EVENTS = protocol.events_topic(PREFIX, STORE)


@pytest.fixture
def hub(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker, stores=(STORE, "store-0043")) as running:
        yield running


@pytest.fixture
async def store(broker):
    client = mqtt_client(broker, "test-store")
    await client.start()
    await client.wait_subscribed(10)
    yield client
    await client.stop()


async def send_and_wait_ack(store, watcher, topic, payload):
    before = len(watcher.seen)
    await asyncio.wait_for(store.publish(topic, payload), 10)
    await eventually(lambda: len(watcher.seen) > before, what=f"an ack after a publish on {topic}")
    return watcher.last


async def test_duplicates_are_ignored_and_out_of_order_acks_stay_at_prefix(hub, broker, store):
    async with AckWatcher(broker) as acks:
        assert await send_and_wait_ack(store, acks, EVENTS, batch(1, 10)) == 10
        assert await send_and_wait_ack(store, acks, EVENTS, batch(1, 10)) == 10       # duplicate
        assert await send_and_wait_ack(store, acks, EVENTS, batch(21, 30)) == 10      # after a gap
        assert await send_and_wait_ack(store, acks, EVENTS, batch(5, 15)) == 15       # overlap
        assert await send_and_wait_ack(store, acks, EVENTS, batch(16, 20)) == 30      # gap filled
        assert acks.seen == sorted(acks.seen), "acks never go backwards while the hub holds its data"
    assert [e["seq"] for e in hub.export()] == list(range(1, 31))
    stats = hub.stats()["stores"][STORE]
    assert stats | {"chain_hash": None} == {"events": 30, "max_seq": 30, "acked_seq": 30, "conflicts": 0,
                                            "chain_hash": None, "unanchored_batches": 5, "chain_breaks": 0}
    assert hub.running


async def test_garbage_and_mismatches_are_refused_counted_and_hub_keeps_acking(hub, broker, store):
    other = protocol.events_topic(PREFIX, "store-0043")
    refused = [
        (EVENTS, b"\xff\xfe not json"),
        (EVENTS, b'{"v": 1}'),
        (EVENTS, b'{"v": 2, "store_id": "store-0042", "first_seq": 1, "last_seq": 1, "events": []}'),
        (EVENTS, protocol.encode_batch(STORE, 1, 3, [body(1), body(3), body(2)])),     # not in order
        (EVENTS, protocol.encode_batch(STORE, 1, 2, [body(1)])),                       # count mismatch
        (other, batch(1, 3)),                                                # topic vs payload store
        (EVENTS, protocol.encode_batch(STORE, 1, 2, [body(1), body(2, "store-0043")])),  # event store
        (protocol.events_topic(PREFIX, "store-9999"), batch(1, 3, "store-9999")),        # unknown store
    ]
    async with AckWatcher(broker) as acks:
        for topic, payload in refused:
            await asyncio.wait_for(store.publish(topic, payload), 10)
        await eventually(lambda: sum(hub.stats()["rejected"].values()) == len(refused), what="8 rejections")
        assert await send_and_wait_ack(store, acks, EVENTS, batch(1, 4)) == 4
    stats = hub.stats()
    assert stats["rejected"] == {"undecodable": 5, "store_mismatch": 2, "unknown_store": 1}
    assert stats["stores"][STORE]["events"] == 4
    assert "store-9999" not in stats["stores"]
    assert "store-0043" not in stats["stores"] or stats["stores"]["store-0043"]["events"] == 0
    assert hub.running


async def test_conflicting_event_is_kept_out_and_alarmed(hub, broker, store):
    async with AckWatcher(broker) as acks:
        assert await send_and_wait_ack(store, acks, EVENTS, batch(1, 5)) == 5
        forged = protocol.encode_batch(STORE, 3, 3, [body(3, event_id="11111111-1111-7111-8111-111111111111")])
        assert await send_and_wait_ack(store, acks, EVENTS, forged) == 5
        assert await send_and_wait_ack(store, acks, EVENTS, batch(6, 6)) == 6
    exported = hub.export()
    assert [e["seq"] for e in exported] == [1, 2, 3, 4, 5, 6]
    assert exported[2]["event_id"] == "00000000-0000-7000-8000-000000000003"
    assert hub.stats()["stores"][STORE]["conflicts"] == 1
    assert "ALARM conflict for store-0042 seq 3" in hub.output()


async def test_restarted_hub_restates_its_ack(tmp_path, broker, store):
    with HubProcess(tmp_path / "hub", broker) as hub:
        async with AckWatcher(broker, client_id="w1") as acks:
            assert await send_and_wait_ack(store, acks, EVENTS, batch(1, 7)) == 7
        hub.kill()
        # Wipe the retained ack so only the restarted hub can restate it.
        await asyncio.wait_for(store.publish(protocol.ack_topic(PREFIX, STORE), b"", retain=True), 5)
        hub.start()
        async with AckWatcher(broker, client_id="w2") as acks:
            await eventually(lambda: acks.last == 7, what="the restated ack 7")
