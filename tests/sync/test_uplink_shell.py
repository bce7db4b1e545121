"""The uplink's shell (sync/uplink.py) over a real mosquitto, with in-memory LogFeed and SyncState.

A test client plays the hub: it records every batch and acks when told (or at once).
The fakes keep the Protocols' contracts (sync/ports.py): the feed is used by one thread
at a time and cuts batches within both caps; every state write is committed when its
call returns, and a write that never returns commits nothing.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest

from agent.settings import AgentConfig, MqttSection, StoreSection, SyncSection
from sync import protocol
from sync.mqtt import Message
from sync.ports import ApplyOutcome, Batch, UplinkStatus
from sync.uplink import Uplink, agent_mqtt
from tests.sync.helpers import PREFIX, STORE, FakeHub, body, eventually, mqtt_client

ACK = protocol.ack_topic(PREFIX, STORE)

pytestmark = pytest.mark.timeout(60)


class ListFeed:
    """`LogFeed` over a list of event bodies (seq = index + 1); fails a test on concurrent use."""

    def __init__(self, n: int = 0):
        self.bodies: list[bytes] = []
        self.reads: list[int] = []            # after_seq of every batch read
        self._seen: int | None = None
        self._busy = threading.Lock()
        self.append(n)

    def append(self, n: int) -> None:
        """The agent appends `n` events (the writer side: not part of LogFeed)."""
        self.bodies += [body(seq) for seq in range(len(self.bodies) + 1, len(self.bodies) + n + 1)]

    @contextmanager
    def _use(self):
        if not self._busy.acquire(blocking=False):
            raise AssertionError("LogFeed used by two threads at once")
        try:
            yield
        finally:
            self._busy.release()

    def last_seq(self) -> int:
        with self._use():
            return len(self.bodies)

    def changed(self) -> bool:
        with self._use():
            changed, self._seen = self._seen != len(self.bodies), len(self.bodies)
            return changed

    def batch(self, after_seq: int, max_events: int, max_bytes: int) -> Batch | None:
        with self._use():
            self.reads.append(after_seq)
            rows = self.bodies[after_seq:after_seq + max_events]
            size, count = 0, 0
            for row in rows:
                size += len(row) + 1
                if size > max_bytes and count:
                    break
                count += 1
            if not count:
                return None
            return Batch(after_seq + 1, after_seq + count, count, b",".join(rows[:count]))

    def close(self) -> None:
        pass


class DictState:
    """`SyncState` in a dict; `gate` (when set) holds cursor writes until it is set."""

    def __init__(self, acked_seq: int = 0, at: str | None = None):
        self.data: dict = {"cursor": (acked_seq, at), "status": None, "beats": 0, "counts": {}}
        self.cursors: list[int] = []          # every committed cursor write, in order
        self.cursor_wanted = asyncio.Event()  # a cursor write has started
        self.gate: asyncio.Event | None = None
        self.snapshot_version: int | None = None
        self.catalog_version: int | None = None

    @property
    def status(self) -> UplinkStatus | None:
        return self.data["status"]

    async def cursor(self) -> tuple[int, str | None]:
        return self.data["cursor"]

    async def ack_mark(self) -> tuple[str | None, int | None]:
        return self.data.get("mark", (None, None))

    async def store_cursor(self, acked_seq: int, at: str, status: UplinkStatus | None = None,
                           mark: tuple[str | None, int | None] = (None, None)) -> None:
        self.cursor_wanted.set()
        if self.gate is not None:
            await self.gate.wait()            # cancelled here: nothing committed
        self.data["cursor"] = (acked_seq, at)
        self.data["mark"] = mark
        self.cursors.append(acked_seq)
        if status is not None:
            self.data["status"] = status

    async def store_status(self, status: UplinkStatus) -> None:
        self.data["status"] = status
        self.data["beats"] += 1

    async def beat(self) -> None:
        self.data["beats"] += 1

    async def add_counts(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            self.data["counts"][key] = self.data["counts"].get(key, 0) + n

    async def apply_snapshot(self, version, generated_at, rows, digest, sources=()) -> ApplyOutcome:
        if self.snapshot_version is not None and version <= self.snapshot_version:
            return ApplyOutcome(False, self.snapshot_version)
        held, self.snapshot_version = self.snapshot_version, version
        return ApplyOutcome(True, held, changed=len(rows))

    async def apply_catalog(self, version, items) -> bool:
        if self.catalog_version is not None and version <= self.catalog_version:
            return False
        self.catalog_version = version
        return True

    async def close(self) -> None:
        pass


def config(broker, **sync) -> AgentConfig:
    return AgentConfig(store=StoreSection(id=STORE),
                       mqtt=MqttSection(host=broker.host, port=broker.port, reconnect_min_s=0.05,
                                        reconnect_max_s=0.3),
                       sync=SyncSection(**({"batch_max_events": 50, "max_inflight": 2} | sync)))


class Running:
    """An uplink with its client started and `run()` as a task, as sync/app.py runs it."""

    def __init__(self, broker, feed: ListFeed, state: DictState, **sync):
        self.config = config(broker, **sync)
        self.feed, self.state = feed, state
        self.mqtt = agent_mqtt(self.config)
        self.uplink: Uplink | None = None
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Running":
        self.uplink = await Uplink.open(self.config, self.feed, self.state, self.mqtt)
        await self.mqtt.start()
        self.task = asyncio.create_task(self.uplink.run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        await self.mqtt.stop()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


@pytest.fixture
async def hub(broker):
    async with FakeHub(broker) as hub:
        yield hub


def cursor(state: DictState) -> int:
    return state.data["cursor"][0]


async def test_batches_arrive_in_order_and_the_cursor_follows_the_acks(broker, hub):
    hub.auto = True
    feed, state = ListFeed(230), DictState()
    async with Running(broker, feed, state):
        await eventually(lambda: cursor(state) == 230, what="cursor 230")
        feed.append(40)                         # learned from the feed's poll, no message
        await eventually(lambda: cursor(state) == 270, what="cursor 270")
        await eventually(lambda: state.status and state.status.sent_seq == 270, what="status sent 270")
    assert hub.batches == [(s, min(s + 49, 230)) for s in range(1, 231, 50)] + [(231, 270)]
    assert hub.seqs == list(range(1, 271))
    assert state.cursors == sorted(state.cursors) and state.cursors[-1] == 270
    assert state.status.connected and state.status.events_sent == 270 and state.status.resends == 0


async def probe_session(broker, client_id: str) -> list[Message]:
    """Resume the session `client_id` and return the ack messages up to the retained copy.

    The broker redelivers a session's unacknowledged messages (DUP) on reconnect, before
    it answers the subscription with the retained ack.
    """
    seen: list[Message] = []
    probe = mqtt_client(broker, client_id)

    async def record(message: Message) -> None:
        seen.append(message)

    probe.subscribe(ACK, record)
    await probe.start()
    try:
        await eventually(lambda: any(m.retain for m in seen), what="the retained ack")
    finally:
        await probe.stop()
    return seen


async def test_the_ack_message_is_acknowledged_only_after_the_cursor_is_stored(broker, hub):
    feed, state = ListFeed(10), DictState()
    state.gate = asyncio.Event()               # cursor writes hang
    running = Running(broker, feed, state)
    async with running:
        await eventually(lambda: (1, 10) in hub.batches, what="the batch")
        await hub.ack(10)
        await eventually(state.cursor_wanted.is_set, what="the cursor write")
    # Stopped while the write hung: nothing stored, the ack message left unacknowledged.
    assert cursor(state) == 0 and state.cursors == []
    redelivered = [m for m in await probe_session(broker, running.mqtt.client_id) if m.dup]
    assert [protocol.decode(m.payload, protocol.Ack).acked_seq for m in redelivered] == [10]
    # With the write going through, the ack is stored, then acknowledged: nothing to redeliver.
    state.gate.set()
    async with Running(broker, feed, state):
        await eventually(lambda: cursor(state) == 10, what="the retained ack stored")
    assert state.cursors == [10]
    assert [m.dup for m in await probe_session(broker, running.mqtt.client_id)] == [False]


async def test_no_ack_progress_resends_from_acked_plus_one(broker, hub):
    feed, state = ListFeed(100), DictState()
    async with Running(broker, feed, state, ack_timeout_s=0.3):
        await eventually(lambda: (51, 100) in hub.batches, what="both batches")
        await hub.ack(50)
        await eventually(lambda: hub.batches.count((51, 100)) >= 2, what="a resend of 51..100")
        assert cursor(state) == 50
        await eventually(lambda: state.status.resends >= 1, what="the resend in the status")
        await hub.ack(100)
        await eventually(lambda: cursor(state) == 100, what="cursor 100")
    assert (1, 50) not in hub.batches[1:]           # never sent again once acked


async def test_a_lower_ack_rewinds_the_cursor_and_resends_from_there(broker, hub):
    feed, state = ListFeed(100), DictState()
    async with Running(broker, feed, state):
        await eventually(lambda: (51, 100) in hub.batches, what="both batches")
        await hub.ack(100)
        await eventually(lambda: cursor(state) == 100, what="cursor 100")
        sent_before = len(hub.batches)
        await hub.ack(30)                           # the hub restored an older database
        await eventually(lambda: hub.batches[sent_before:sent_before + 2] == [(31, 80), (81, 100)],
                         what="a resend from 31")
        assert cursor(state) == 30 and state.cursors[-2:] == [100, 30]
        assert state.status.rewinds == 1           # stored with the cursor, in one write
        await hub.ack(100)
        await eventually(lambda: cursor(state) == 100, what="cursor 100 again")


async def test_an_ack_above_the_log_is_an_alarm_and_never_trusted(broker, hub):
    feed, state = ListFeed(40), DictState()
    async with Running(broker, feed, state) as running:
        await eventually(lambda: (1, 40) in hub.batches, what="the batch")
        await hub.ack(20)
        await eventually(lambda: cursor(state) == 20, what="cursor 20")
        await hub.ack(5000)
        await eventually(lambda: state.status.ack_alarms == 1, what="the alarm stored")
        assert "says 5000 but the log ends at 40" in state.status.alarm
        assert cursor(state) == 20 and running.uplink.acked_seq == 20
        assert state.cursors == [20]


async def test_the_next_window_is_read_ahead_and_dropped_on_a_rewind(broker, hub):
    feed, state = ListFeed(600), DictState()
    async with Running(broker, feed, state, max_inflight=4):
        await eventually(lambda: (151, 200) in hub.batches, what="a full window")
        # While 1..200 wait for their ack, 201..400 are read ahead.
        await eventually(lambda: 350 in feed.reads, what="the read-ahead of 201..400")
        await hub.ack(200)
        await eventually(lambda: (351, 400) in hub.batches, what="the next window")
        assert hub.batches[:8] == [(s, s + 49) for s in range(1, 400, 50)]
        assert feed.reads.count(200) == 1           # published from the read-ahead, not read again
        sent_before = len(hub.batches)
        await hub.ack(30)                           # a rewind while 401..600 are read ahead
        await eventually(lambda: len(hub.batches) >= sent_before + 4, what="a resent window")
        assert hub.batches[sent_before:sent_before + 4] == [(31, 80), (81, 130), (131, 180), (181, 230)]
        await hub.ack(600)
        await eventually(lambda: cursor(state) == 600, what="cursor 600")


async def test_a_stored_cursor_beyond_the_log_is_clamped_to_its_end(broker):
    feed, state = ListFeed(40), DictState(500, "2026-11-27T13:05:00.123Z")
    uplink = await Uplink.open(config(broker), feed, state, agent_mqtt(config(broker)))
    assert uplink.acked_seq == 40 and cursor(state) == 40
    assert uplink.status() == UplinkStatus(sent_seq=40)
