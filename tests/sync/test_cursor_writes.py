"""The uplink's cursor writes coalesce: acks that arrive while the cursor is being written
are covered by one write of the latest; each ack message is acknowledged to the broker
only after a write that covers it, in the order the messages came.

Real broker, real log; the uplink runs in this process with a cursor store that takes
0.3 s per write (as a slow disk would), wrapping the real one.
"""

import asyncio

import msgspec
import pytest

from agent import events as ev
from agent.log import SqliteEventLog
from agent.settings import AgentConfig
from sync import protocol
from sync.uplink import Uplink, load_cursor, store_cursor
from tests.sync.helpers import PREFIX, STORE, eventually, mqtt_client

WRITE_S = 0.3


@pytest.fixture
async def rig(tmp_path, broker):
    log = await SqliteEventLog.open(tmp_path / "events.db", STORE)
    await log.append(ev.AppendCommand("c1", [ev.Receive(sku=f"S{i}", qty=1) for i in range(100)]))
    config = msgspec.convert({"store": {"id": STORE},
                              "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05},
                              "sync": {"batch_max_events": 10, "max_inflight": 64}}, AgentConfig)
    written: list[int] = []

    async def slow_store(seq: int, at: str) -> None:
        written.append(seq)
        await asyncio.sleep(WRITE_S)
        await log.write(lambda conn: store_cursor(conn, seq, at))

    uplink = await Uplink.open(config, log, store_cursor=slow_store)
    acked_mids: list[int] = []
    paho_ack = uplink.mqtt._client.ack

    def recording_ack(mid: int, qos: int):  # observes what goes to the broker; still sends it
        acked_mids.append(mid)
        return paho_ack(mid, qos)

    uplink.mqtt._client.ack = recording_ack
    hub = mqtt_client(broker, "fake-hub")
    await hub.start()
    running = asyncio.get_running_loop().create_task(uplink.run())
    await eventually(lambda: uplink.sent_seq == 100, what="all 100 events sent")
    yield uplink, hub, log, written, acked_mids
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await hub.stop()
    await log.close()


async def send_acks(hub, seqs: list[int]) -> None:
    topic = protocol.ack_topic(PREFIX, STORE)
    for seq in seqs:
        await hub.publish(topic, protocol.encode(protocol.Ack(store_id=STORE, acked_seq=seq)))


async def test_acks_during_a_write_are_covered_by_one_write_of_the_latest(rig):
    uplink, hub, log, written, acked_mids = rig
    await send_acks(hub, list(range(10, 101, 10)))
    await eventually(lambda: uplink.acked_seq == 100 and len(acked_mids) == 10, what="ack 100 stored")
    # The first ack is written alone; the nine that came during its write take one more.
    assert written[-1] == 100 and len(written) <= 3, written
    assert written == sorted(written)
    assert await load_cursor(log) == (100, uplink.last_ack_at)
    # Every ack message was acknowledged, after its write, in the order it was delivered.
    assert acked_mids == sorted(acked_mids)


async def test_a_lower_ack_during_a_write_wins_as_a_rewind(rig):
    uplink, hub, log, written, acked_mids = rig
    await send_acks(hub, [90, 100, 40])
    await eventually(lambda: len(acked_mids) == 3, what="the three acks acknowledged")
    assert uplink.acked_seq == 40 and uplink.rewinds == 1
    assert written == [90, 40]   # 100 was superseded by 40 before its write began
    assert (await load_cursor(log))[0] == 40


async def test_a_failed_write_leaves_its_acks_unacknowledged(rig, monkeypatch):
    uplink, hub, log, written, acked_mids = rig
    store = uplink._store_cursor
    calls = []

    async def failing_once(seq: int, at: str) -> None:
        calls.append(seq)
        if len(calls) == 1:
            raise OSError("disk full")
        await store(seq, at)

    monkeypatch.setattr(uplink, "_store_cursor", failing_once)
    await send_acks(hub, [50])
    await eventually(lambda: calls == [50], what="the failed write")
    await asyncio.sleep(WRITE_S)
    assert acked_mids == [] and uplink.acked_seq == 0
    assert (await load_cursor(log))[0] == 0
    await send_acks(hub, [60])
    await eventually(lambda: uplink.acked_seq == 60 and len(acked_mids) == 1, what="ack 60 stored")
    assert (await load_cursor(log))[0] == 60
