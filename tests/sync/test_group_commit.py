"""Group commit at the hub: batches that wait together share one transaction, and every
message of the group is answered (ack published, handler returns so MQTT may PUBACK)
only after that commit, with the contiguous prefix only.

A real HubStore on a tmp file; the MQTT side is a recording fake, so the test controls
when each batch arrives and when the commit may finish.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sync import protocol
from sync.hub import projection
from sync.hub.service import HubService
from sync.hub.settings import load_hub_config
from sync.hub.store import HubStore, Incoming
from sync.mqtt import Message
from tests.sync.helpers import PREFIX, STORE, batch

EVENTS = protocol.events_topic(PREFIX, STORE)


class FakeMqtt:
    """Records publishes; the hub's handlers are called directly by the test."""

    protocol = 5

    def __init__(self, trace: list):
        self.trace = trace

    def subscribe(self, *args, **kwargs) -> None:
        pass

    def on_connection_change(self, fn) -> None:
        pass

    def publish(self, topic, payload, qos=1, retain=False, content_type=None) -> asyncio.Future:
        if topic == protocol.ack_topic(PREFIX, STORE):
            self.trace.append(("ack", json.loads(payload)["acked_seq"]))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class GatedStore:
    """Wraps HubStore.write: records each group, and can hold a commit until released."""

    def __init__(self, store: HubStore, trace: list):
        self.store, self.trace = store, trace
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False
        self.ack_reads = 0
        self.groups: list = []

    async def acked(self, store_id):
        self.ack_reads += 1
        return await self.store.acked(store_id)

    async def write(self, items, now):
        self.trace.append(("write", [(i.events[0][0].seq, i.events[-1][0].seq) if isinstance(i, Incoming)
                                     else i.reason for i in items]))
        self.groups.append([(i.store_id, i.events[0][0].seq, i.events[-1][0].seq) for i in items
                            if isinstance(i, Incoming)])
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("disk on fire")
        results = await self.store.write(items, now)
        self.trace.append(("committed", await self.store.acked(STORE)))
        return results

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.fixture
def extra_config() -> str:
    return ""


@pytest.fixture
async def hub(tmp_path, extra_config):
    (tmp_path / "hub.toml").write_text(f'[storage]\npath = "{tmp_path / "hub.db"}"\n[[stores]]\nid = "{STORE}"\n'
                                       + extra_config)
    config = load_hub_config(tmp_path / "hub.toml", environ={})
    store = await HubStore.open(config.storage.path, config.store_ids())
    await store.run(projection.setup)
    store.ingest_hooks.append(projection.pending_deltas)
    trace: list = []
    service = HubService(config, GatedStore(store, trace), FakeMqtt(trace))
    writer = asyncio.create_task(service._writer())
    yield service, trace
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.close()


def message(payload: bytes) -> Message:
    return Message(EVENTS, payload, 1, False)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_waiting_batches_share_one_commit_and_are_answered_after_it(hub):
    service, trace = hub
    gated: GatedStore = service.store
    gated.gate.clear()
    first = asyncio.create_task(service.handle_events(message(batch(1, 10))))
    await settle()
    assert trace == [("write", [(1, 10)])]          # the writer holds 1..10, its commit not done
    later = [asyncio.create_task(service.handle_events(message(p)))
             for p in (batch(21, 30), batch(11, 20), batch(5, 8))]  # a gap, its filler, a duplicate
    await settle()
    assert not first.done() and not any(t.done() for t in later), "nothing is answered before its commit"
    assert trace == [("write", [(1, 10)])]
    gated.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert trace == [
        ("write", [(1, 10)]), ("committed", 10), ("ack", 10),
        ("write", [(21, 30), (11, 20), (5, 8)]), ("committed", 30), ("ack", 30),
    ]
    assert service.counters["events_stored"] == 30 and service.counters["events_duplicate"] == 4
    stock = projection.stock(service.reader.conn)[STORE]
    assert stock == {"A1": (0, 30, 0)}, "each stored event is projected once, duplicates not at all"


async def test_a_gap_inside_one_group_acks_only_the_prefix(hub):
    service, trace = hub
    gated: GatedStore = service.store
    gated.gate.clear()
    blocker = asyncio.create_task(service.handle_events(message(batch(1, 5))))
    await settle()
    rest = [asyncio.create_task(service.handle_events(message(p))) for p in (batch(11, 15), batch(7, 9))]
    await settle()
    gated.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *rest), 10)
    assert [t for t in trace if t[0] == "ack"] == [("ack", 5), ("ack", 5)]
    assert await service.store.acked(STORE) == 5
    await asyncio.wait_for(service.handle_events(message(batch(6, 6))), 10)
    await asyncio.wait_for(service.handle_events(message(batch(10, 10))), 10)
    assert trace[-1] == ("ack", 15), "the held events after the gap count once it fills"


async def test_a_failed_commit_answers_no_message_of_the_group(hub):
    service, trace = hub
    gated: GatedStore = service.store
    gated.gate.clear()
    gated.fail_next = True
    tasks = [asyncio.create_task(service.handle_events(message(batch(1, 3))))]
    await settle()
    tasks.append(asyncio.create_task(service.handle_events(message(batch(4, 6)))))
    await settle()
    gated.gate.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    # The first group failed: its handler raises, so the MQTT adapter leaves the message
    # unacknowledged for redelivery; nothing was stored and no ack was published for it.
    assert isinstance(done[0], RuntimeError) and done[1] is None
    assert await service.store.acked(STORE) == 0, "4..6 alone is after a gap: held, not acked"
    assert [t for t in trace if t[0] == "ack"] == [("ack", 0)]
    await asyncio.wait_for(service.handle_events(message(batch(1, 3))), 10)   # the redelivery
    assert trace[-1] == ("ack", 6)


@pytest.mark.parametrize("extra_config", ["[ingest]\nmax_ahead = 20\n"])
async def test_max_ahead_reads_the_ack_this_worker_published_and_the_database_before_refusing(hub):
    service, trace = hub
    gated: GatedStore = service.store
    await asyncio.wait_for(service.handle_events(message(batch(1, 10))), 10)
    assert gated.ack_reads == 1, "the first message of a store reads its ack"
    await asyncio.wait_for(service.handle_events(message(batch(11, 20))), 10)
    assert gated.ack_reads == 1, "later ones check against the ack this worker published"
    # Another worker stores 21..30: the database's ack moves past the one published here.
    await gated.store.write([service._anchored(EVENTS, STORE, *protocol.decode_batch(batch(21, 30),
                                                                                     service.event_view))], "t")
    await asyncio.wait_for(service.handle_events(message(batch(31, 45))), 10)
    assert gated.ack_reads == 2, "past the published ack + max_ahead, the database decides"
    assert await gated.store.acked(STORE) == 45 and service.counters["rejected_too_far_ahead"] == 0
    await asyncio.wait_for(service.handle_events(message(batch(70, 80))), 10)
    assert gated.ack_reads == 3 and service.counters["rejected_too_far_ahead"] == 1
    assert await gated.store.acked(STORE) == 45 and trace[-1] == ("ack", 45), "refused, the ack restated"
    other = Message(protocol.events_topic(PREFIX, "S-OTHER"), batch(1, 1, store_id="S-OTHER"), 1, False)
    await asyncio.wait_for(service.handle_events(other), 10)
    assert gated.ack_reads == 3 and service.counters["rejected_unknown_store"] == 1, \
        "a store not in [[stores]] costs no read"


@pytest.mark.parametrize("extra_config", ['[ingest]\nmax_events_per_commit = 20\n[[stores]]\nid = "S-B"\n'])
async def test_a_store_sending_little_waits_one_commit_not_behind_another_stores_backlog(hub):
    service, trace = hub
    gated: GatedStore = service.store
    gated.gate.clear()
    first = asyncio.create_task(service.handle_events(message(batch(1, 10))))
    await settle()
    backlog = [asyncio.create_task(service.handle_events(message(batch(a, a + 19)))) for a in (11, 31, 51)]
    await settle()
    steady = asyncio.create_task(service.handle_events(
        Message(protocol.events_topic(PREFIX, "S-B"), batch(1, 1, store_id="S-B"), 1, False)))
    await settle()
    gated.gate.set()
    await asyncio.wait_for(asyncio.gather(first, steady, *backlog), 10)
    assert gated.groups == [
        [(STORE, 1, 10)],
        [("S-B", 1, 1), (STORE, 11, 30)],   # the store with the fewest bytes waiting goes first
        [(STORE, 31, 50)],                  # a group closes at max_events_per_commit (20)
        [(STORE, 51, 70)],
    ]
    assert await gated.store.acked(STORE) == 70 and await gated.store.acked("S-B") == 1
