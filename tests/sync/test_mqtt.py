"""The paho adapter against a real mosquitto: PUBACK futures, manual acks, reconnects, will."""

import asyncio

from sync.mqtt import LastWill, Message, MqttClient


def client(broker, cid, **kw) -> MqttClient:
    return MqttClient(host=broker.host, port=broker.port, client_id=cid,
                      reconnect_min_s=0.05, reconnect_max_s=0.3, **kw)


async def eventually(predicate, timeout=10.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_publish_resolves_on_puback_and_handler_receives(broker):
    got: list[Message] = []

    async def handler(message: Message) -> None:
        got.append(message)

    sub = client(broker, "t-sub")
    sub.subscribe("t/+/x", handler)
    pub = client(broker, "t-pub", protocol=4)
    await sub.start()
    await pub.start()
    try:
        await sub.wait_subscribed(5)
        await pub.wait_subscribed(5)
        await asyncio.wait_for(asyncio.gather(*[pub.publish("t/a/x", b"%d" % i) for i in range(50)]), 5)
        await eventually(lambda: len(got) == 50, what="50 messages")
        assert [m.payload for m in got] == [b"%d" % i for i in range(50)]
    finally:
        await pub.stop()
        await sub.stop()


async def test_adapter_reconnects_and_keeps_delivering_after_broker_crash(broker):
    calls: list[bytes] = []

    async def handler(message: Message) -> None:
        calls.append(message.payload)
        if len(calls) == 1:
            raise RuntimeError("commit failed")

    sub = client(broker, "t-sub2")
    sub.subscribe("t/y", handler)
    pub = client(broker, "t-pub2")
    await sub.start()
    await pub.start()
    try:
        await sub.wait_subscribed(5)
        await pub.wait_subscribed(5)
        await asyncio.wait_for(pub.publish("t/y", b"one"), 5)
        await eventually(lambda: len(calls) == 1, what="first delivery")
        # The unacked message is redelivered on the next connection of the same session.
        broker.kill()
        broker.start()
        await eventually(lambda: sub.reconnects >= 1 and sub.connected, what="reconnect")
        # The restarted broker kept no sessions: publish only once the subscription is back
        # (SUBACK) and the publisher is connected again, or "two" has nobody to go to.
        await sub.wait_subscribed(5)
        await pub.wait_subscribed(5)
        await asyncio.wait_for(pub.publish("t/y", b"two"), 5)
        await eventually(lambda: b"two" in calls, what="second message")
        assert calls[0] == b"one" and sub.reconnects >= 1
    finally:
        await pub.stop()
        await sub.stop()


async def test_unacked_message_is_redelivered_after_client_reconnect(broker):
    calls: list[bytes] = []
    fail = True

    async def handler(message: Message) -> None:
        calls.append(message.payload)
        if fail:
            raise RuntimeError("commit failed")

    sub = client(broker, "t-sub3")
    sub.subscribe("t/z", handler)
    pub = client(broker, "t-pub3")
    await sub.start()
    await pub.start()
    try:
        await sub.wait_subscribed(5)
        await pub.wait_subscribed(5)
        await asyncio.wait_for(pub.publish("t/z", b"keep"), 5)
        await eventually(lambda: len(calls) == 1, what="first delivery")
        await sub.stop()
        fail = False
        sub2 = client(broker, "t-sub3")
        sub2.subscribe("t/z", handler)
        await sub2.start()
        await eventually(lambda: len(calls) == 2, what="redelivery")
        assert calls == [b"keep", b"keep"]
        await sub2.stop()
        sub3 = client(broker, "t-sub3")
        sub3.subscribe("t/z", handler)
        await sub3.start()
        await sub3.wait_subscribed(5)
        await asyncio.wait_for(pub.publish("t/z", b"next"), 5)
        await eventually(lambda: b"next" in calls, what="next")
        assert calls.count(b"keep") == 2, "an acked message must not come back"
        await sub3.stop()
    finally:
        await pub.stop()


async def test_will_and_birth_are_retained_status(broker):
    seen: list[bytes] = []

    async def handler(message: Message) -> None:
        seen.append(message.payload)

    agent = client(broker, "t-agent", birth=LastWill("s/status", b"online"),
                   will=LastWill("s/status", b"offline"))
    await agent.start()
    await agent.wait_subscribed(5)
    watcher = client(broker, "t-watch")
    watcher.subscribe("s/status", handler)
    await watcher.start()
    try:
        await eventually(lambda: seen[-1:] == [b"online"], what="online")
        await agent.stop()
        await eventually(lambda: seen[-1:] == [b"offline"], what="offline")
    finally:
        await watcher.stop()
