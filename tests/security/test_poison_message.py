"""One store's undecodable batches never stop the hub's ingest for the others.

A real mosquitto and a real `edge-hub run`. The poison is JSON nested 2,000 deep inside
an event: before the decoders mapped that to their own error, msgspec's RecursionError
escaped the hub's handler, the message stayed unacknowledged, and once the broker's
in-flight window (64 here, mosquitto's `max_inflight_messages`; 20 by default) was full of
them no other store's batch reached the hub, again after every restart (the broker
redelivers unacknowledged messages to the persistent session).
"""

import asyncio

from sync import protocol
from tests.sync.helpers import PREFIX, AckWatcher, batch, body, eventually, mqtt_client
from tests.sync.hubproc import HubProcess

A, B = "store-0042", "store-0043"
POISON_COUNT = 100   # more than the broker's in-flight window for the hub's session
DEEP = b"[" * 2000 + b"]" * 2000


def poison(n: int) -> bytes:
    event = body(n, A)[:-1] + b',"x":' + DEEP + b"}"
    return protocol.encode_batch(A, n, n, [event])


async def test_deep_nested_batches_on_one_store_do_not_stall_another_store(tmp_path, broker):
    sender = mqtt_client(broker, "test-stores")
    await sender.start()
    await sender.wait_subscribed(10)
    try:
        with HubProcess(tmp_path / "hub", broker, stores=(A, B)) as hub:
            await asyncio.gather(*(asyncio.wait_for(sender.publish(protocol.events_topic(PREFIX, A), poison(n)), 10)
                                   for n in range(1, POISON_COUNT + 1)))
            async with AckWatcher(broker, store_id=B, client_id="watch-b") as acks:
                await asyncio.wait_for(sender.publish(protocol.events_topic(PREFIX, B), batch(1, 3, B)), 10)
                await eventually(lambda: acks.last == 3, timeout=20, what="store B's ack 3 behind A's poison")
            assert hub.stats()["rejected"] == {"undecodable": POISON_COUNT}

            # A restart must not find the poison again: every refused message was acknowledged.
            hub.kill()
            hub.start()
            async with AckWatcher(broker, store_id=B, client_id="watch-b2") as acks:
                await asyncio.wait_for(sender.publish(protocol.events_topic(PREFIX, B), batch(4, 6, B)), 10)
                await eventually(lambda: acks.last == 6, timeout=20, what="store B's ack 6 after the restart")
            assert hub.stats()["rejected"] == {"undecodable": POISON_COUNT}
            assert [e["seq"] for e in hub.export(B)] == [1, 2, 3, 4, 5, 6]
            assert hub.export(A) == []
            assert "RecursionError" not in hub.output()
            assert hub.running
    finally:
        await sender.stop()
