"""The reference hub: ingest every store's event batches, ack what is durably held.

`HubService` owns the hub's parts and exposes them for other hub jobs:

    service.config   HubConfig          service.store   HubStore (the single writer)
    service.mqtt     MqttClient         service.reader  HubReader (read-only, on the loop)
    service.jobs     extra long-running `async def job()` callables started by `run`
    service.add_commit_listener(fn)     fn(acked: dict[store_id, acked_seq]) after each commit

Rules kept here (docs/protocol.md): a batch is refused (counted, recorded in
`rejections`, logged at most once a minute per store and reason, nothing stored) when
its payload does not decode (JSON nested too deep and duplicated keys included), when
the topic's, payload's or an event's store_id differ, when the store is not in
`[[stores]]`, when it reaches past the store's ack + `ingest.max_ahead`, when its bodies
do not chain to its own `hash` (`chain_invalid`), or when its chain does not continue
the one the hub holds for the store (`chain_broken`, an ALARM). A refused
message is acknowledged like a stored one, so no bad message holds one of the broker's
in-flight slots; a batch refused as too far ahead or for its chain also gets the store's current ack.
Batches that wait together are stored in one transaction; only after that commit are
the stores' retained acks published and the MQTT messages acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Awaitable, Callable

from common import chain, clock
from common.notify import Notifier, watchdog_interval, watchdog_pings
from sync import protocol
from sync.hub.history import HistoryServer
from sync.hub.publisher import AvailabilityPublisher
from sync.hub.refusal import RefusalLog
from sync.hub.settings import WORKER_SESSION_EXPIRY_S, HubConfig
from sync.hub.engines import open_storage
from sync.hub.storage import AckState, HubStorage
from sync.hub.store import HubReader, Incoming, Rejection
from sync.mqtt import Message, MqttClient

log = logging.getLogger("edge_hub.service")


class HubService:
    """One running hub. Build with `await HubService.open(config)`; `await run(stop)`."""

    def __init__(self, config: HubConfig, store: HubStorage, mqtt: MqttClient,
                 now: Callable[[], str] = clock.utc_now):
        self.config = config
        self.store = store
        self.mqtt = mqtt
        self.reader = HubReader(store.path) if getattr(store, "path", None) is not None else None  # SQLite only
        self.prefix = config.mqtt.topic_prefix
        self.store_ids = config.store_ids()
        self.jobs: list[Callable[[], Awaitable[None]]] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.writer_task: asyncio.Task | None = None
        self.publisher = None                     # the AvailabilityPublisher, once attached (serve)
        self.last_ack: dict[str, AckState] = {}   # what this worker last published, per store (for /metrics)
        # A lower bound of each store's ack for the `ingest.max_ahead` check, so a message
        # costs no read of the database: the highest ack this worker read or published in
        # the current epoch (cleared when a published ack has another one: a restored hub).
        self._ack_floor: dict[str, int] = {}
        self._floor_epoch: str | None = None
        self._now = now
        self.refusals = RefusalLog(log, config.ingest.refusal_log_interval_s)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._listeners: list[Callable[[dict[str, int]], None]] = []
        # What each event's head is decoded as (protocol.decode_batch's view): the ingest hooks
        # get these heads, so a hook that needs more than the envelope (the availability
        # projection sets its EVENT_VIEW) reads no body again.
        self.event_view = protocol.EventHead
        mqtt.subscribe(config.hub.events_filter(self.prefix), self.handle_events, qos=1, concurrent=True)
        mqtt.on_connection_change(self._connection_changed)

    @classmethod
    async def open(cls, config: HubConfig) -> "HubService":
        """Open the hub's database and build its MQTT client (not yet connected)."""
        store = await open_storage(config)
        # A shared worker's session is short: mosquitto 2.0 keeps queueing a dead member's
        # share of the ingest until its session expires (docs/scaling.md).
        expiry = {"session_expiry_s": WORKER_SESSION_EXPIRY_S} if config.hub.workers_shared else {}
        mqtt = MqttClient.from_settings(config.mqtt, config.hub.client_id(), max_inflight=64, **expiry)
        return cls(config, store, mqtt)

    def add_commit_listener(self, fn: Callable[[dict[str, int]], None]) -> None:
        """Call `fn({store_id: acked_seq})` on the loop after each commit that stored events."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------ ingest

    async def handle_events(self, message: Message) -> None:
        """The MQTT handler for `P/stores/+/events`: returns once the batch is committed.

        Refusals are recorded and return normally (the message is acked and dropped), also
        for a decoder failing in a way it should not; a storage failure raises, so the
        message stays unacked and comes back.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, future))
        await future

    async def _decoded(self, message: Message) -> Incoming | Rejection:
        """The message decoded and checked (the writer's step, as its group is formed, so a
        message waits for no decoding of the backlog queued before it)."""
        store_id = protocol.store_of(self.prefix, message.topic, "events")
        floor = self._ack_floor.get(store_id)
        if floor is None and store_id in self.store_ids:
            floor = self._ack_floor[store_id] = await self.store.acked(store_id)
        item = self._incoming(message, floor or 0)
        if isinstance(item, Rejection) and item.reason == "too_far_ahead":
            # The floor is a committed ack, so never above the database's; another worker's
            # commits may have moved the database's on: read it before refusing.
            item = self._incoming(message, await self.store.acked(store_id))
        if isinstance(item, Rejection):
            self.counters[f"rejected_{item.reason}"] += 1
            self.refusals.refused(item.store_id, item.reason, item.topic, item.detail)
        return item

    def _incoming(self, message: Message, acked: int) -> Incoming | Rejection:
        """Decode and check one events message: the batch to store, or why it is refused.

        `acked`: the topic's store's ack (for `ingest.max_ahead`)."""
        topic_store = protocol.store_of(self.prefix, message.topic, "events")
        try:
            if topic_store not in self.store_ids:
                raise _Refuse("unknown_store", f"store {topic_store!r} is not in [[stores]]")
            batch, events = protocol.decode_batch(message.payload, self.event_view)
            if batch.store_id != topic_store:
                raise _Refuse("store_mismatch",
                              f"topic is for {topic_store!r}, payload for {batch.store_id!r}")
            if batch.last_seq > acked + self.config.ingest.max_ahead:
                # The store's own agent never gets this far ahead: restating the ack tells it
                # where the hub is, and it sends from its cursor again anyway.
                return Rejection(message.topic, topic_store, "too_far_ahead",
                                 f"seqs {batch.first_seq}..{batch.last_seq} reach past ack {acked}"
                                 f" + ingest.max_ahead {self.config.ingest.max_ahead}", restate_ack=True)
            return self._anchored(message.topic, topic_store, batch, events)
        except protocol.ProtocolError as exc:
            return Rejection(message.topic, topic_store, exc.reason, str(exc))
        except _Refuse as exc:
            return Rejection(message.topic, topic_store, exc.reason, exc.detail)
        except Exception as exc:  # a decoder bug: refusing beats holding an in-flight slot for ever
            log.exception("hub: decoding a message on %s failed", message.topic)
            return Rejection(message.topic, topic_store, "decoder_error", f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _anchored(topic: str, store_id: str, batch: protocol.EventBatch, events: list) -> Incoming | Rejection:
        """The batch with its chain computed over the bodies, or `chain_invalid` when that
        does not reach its `hash` (a body altered after it was hashed, or a wrong hash)."""
        if batch.prev_hash is None:
            return Incoming(store_id, events, topic=topic, incarnation=batch.incarnation)
        prev = bytes.fromhex(batch.prev_hash)
        hashes = chain.hashes(prev, [body for _, body in events])
        if hashes[-1].hex() != batch.hash:
            return Rejection(topic, store_id, "chain_invalid",
                             f"seqs {batch.first_seq}..{batch.last_seq}: the bodies chain from prev_hash to"
                             f" {hashes[-1].hex()[:16]}..., the batch says {batch.hash[:16]}...", restate_ack=True)
        return Incoming(store_id, events, prev, hashes, topic, batch.incarnation)

    async def _writer(self) -> None:
        waiting = _Waiting(self.prefix)
        limits = self.config.ingest
        while True:
            if not waiting:
                waiting.add(*await self._queue.get())
            while not self._queue.empty():
                waiting.add(*self._queue.get_nowait())
            group: list = []
            events = 0
            for message, future in waiting.fair():
                try:
                    item = await self._decoded(message)
                except Exception as exc:  # the ack read failed: the message stays unacked, comes back
                    self.counters["storage_errors"] += 1
                    log.error("hub: %s; a message on %s left unacked for redelivery", exc, message.topic)
                    if not future.done():
                        future.set_exception(exc)
                    continue
                group.append((item, future))
                events += len(item.events) if isinstance(item, Incoming) else 1
                if len(group) >= limits.max_messages_per_commit or events >= limits.max_events_per_commit:
                    break
            if group:
                await self._commit(group)

    async def _commit(self, group: list) -> None:
        try:
            results = await self.store.write([item for item, _ in group], self._now())
        except Exception as exc:
            self.counters["storage_errors"] += 1
            log.error("hub: %s; %d messages left unacked for redelivery", exc, len(group))
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            await asyncio.sleep(0.5)  # don't spin on a failing disk
            return
        touched: set[str] = set()
        for (item, future), result in zip(group, results):
            if result is not None:
                touched.add(item.store_id)
                self._count(item.store_id, result)
            elif item.restate_ack:
                touched.add(item.store_id)
            if not future.done():
                future.set_result(None)
        acks = getattr(results, "acks", {})
        states = {store_id: (acks[store_id] if store_id in acks else await self.store.ack_state(store_id))
                  for store_id in touched}
        for store_id, state in states.items():
            self.publish_ack(store_id, state)
        acked = {store_id: state.acked_seq for store_id, state in states.items()}
        for fn in self._listeners:
            try:
                fn(acked)
            except Exception:
                log.exception("hub: commit listener failed")

    def _count(self, store_id: str, result) -> None:
        if result.stale_incarnation is not None:
            self.counters["rejected_stale_incarnation"] += 1
            if self.refusals.refused(store_id, "stale_incarnation", protocol.events_topic(self.prefix, store_id),
                                     result.stale_incarnation):
                log.error("hub: ALARM %s: a batch from an older incarnation of its log (%s); refused,"
                          " nothing stored", store_id, result.stale_incarnation)
            return
        self.counters["events_stored"] += result.stored
        self.counters["events_duplicate"] += result.duplicates
        if result.unanchored:
            self.counters["batches_unanchored"] += 1
        if result.chain_broken is not None:
            self.counters["rejected_chain_broken"] += 1
            if self.refusals.refused(store_id, "chain_broken", protocol.events_topic(self.prefix, store_id),
                                     result.chain_broken):
                log.error("hub: ALARM %s: its hash chain does not continue what the hub holds;"
                          " its batches are not merged and its ack stays at %s", store_id,
                          acked_now(self.store, store_id))
        for seq, held, sent in result.conflicts:
            self.counters["conflicts"] += 1
            log.error("hub: ALARM conflict for %s seq %d: held event %s, received %s (kept out)",
                      store_id, seq, held, sent)

    # ------------------------------------------------------------------- acks

    def publish_ack(self, store_id: str, state: AckState) -> None:
        """Publish a store's retained ack with its mark (call only with a committed `AckState`,
        read from the storage: another worker's ack may be newer, and the rev tells the agent)."""
        self.last_ack[store_id] = state
        if state.epoch != self._floor_epoch:
            self._ack_floor.clear()
            self._floor_epoch = state.epoch
        self._ack_floor[store_id] = max(self._ack_floor.get(store_id, 0), state.acked_seq)
        payload = protocol.encode(protocol.Ack(store_id=store_id, acked_seq=state.acked_seq,
                                               epoch=state.epoch, rev=state.rev))
        try:
            future = self.mqtt.publish(protocol.ack_topic(self.prefix, store_id), payload, qos=1, retain=True)
        except Exception as exc:
            log.warning("hub: could not publish the ack for %s: %s", store_id, exc)
            return
        future.add_done_callback(_ignore_cancel)

    def _connection_changed(self, up: bool) -> None:
        if up:
            # Re-state every ack: one may have been lost with a crash between commit and publish,
            # and a restored (older) database must tell its stores to rewind.
            asyncio.get_running_loop().create_task(self._restate_acks()).add_done_callback(_ignore_cancel)

    async def _restate_acks(self) -> None:
        states = await self.store.ack_states(sorted(self.store_ids))
        for store_id in sorted(self.store_ids):
            self.publish_ack(store_id, states[store_id])

    # -------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> None:
        """Run the writer, MQTT and extra jobs until `stop` is set; then shut down cleanly."""
        writer = self.writer_task = asyncio.create_task(self._writer(), name="hub-writer")
        tasks = [asyncio.create_task(job(), name=getattr(job, "__name__", "hub-job")) for job in self.jobs]
        notifier = Notifier.from_environ()
        interval = watchdog_interval()
        if interval:
            tasks.append(asyncio.create_task(watchdog_pings(notifier, interval), name="hub-watchdog"))
        serving = f"STATUS=serving {len(self.store_ids)} stores"

        def status() -> str:
            alarm = self.mqtt.alarm
            return f"STATUS=ALARM {alarm.code}: {alarm.message}" if alarm else serving

        def alarmed(alarm, since) -> None:
            # The link's alarm (a TLS file, certificate or credentials problem, logged by the
            # client) in `systemctl status edge-hub`; counted in `counters["link_alarms"]`.
            if alarm is not None:
                self.counters["link_alarms"] += 1
            notifier.send(status())

        self.mqtt.on_alarm(alarmed)
        try:
            await self.mqtt.start()
            # Ready once the store is open and the writer runs: MQTT (re)connects on its own.
            notifier.send("READY=1", status(), f"MAINPID={os.getpid()}")
            log.info("hub: ready%s", " (systemd notified)" if notifier.enabled else "")
            await stop.wait()
        finally:
            notifier.send("STOPPING=1", "STATUS=stopping")
            await self.mqtt.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # In-flight writes finish: wait for the queue to drain before stopping the writer.
            while not self._queue.empty() and not writer.done():
                await asyncio.sleep(0.01)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        await self.store.close()


class _Waiting:
    """The messages taken off MQTT and not yet committed, per store, in arrival order.

    `fair()` hands out the next commit's messages: the stores with the fewest payload
    bytes waiting first, one message per store per round; the writer stops taking at
    `ingest.max_messages_per_commit` messages or `ingest.max_events_per_commit` events.
    So a store sending one event waits for one commit, not behind the backlog of stores
    catching up after an outage; each store's own messages keep their order.
    """

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._by_store: dict[str, collections.deque] = {}
        self._bytes: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._by_store)

    def add(self, message: Message, future: asyncio.Future) -> None:
        key = protocol.store_of(self._prefix, message.topic, "events")
        self._by_store.setdefault(key, collections.deque()).append((message, future))
        self._bytes[key] = self._bytes.get(key, 0) + len(message.payload)

    def fair(self):
        """Yield (message, future) in the fair order, each taken off as it is yielded."""
        order = sorted(self._by_store, key=self._bytes.__getitem__)
        while order:
            rest = []
            for key in order:
                queue = self._by_store[key]
                entry = queue.popleft()
                self._bytes[key] -= len(entry[0].payload)
                if queue:
                    rest.append(key)
                else:
                    del self._by_store[key], self._bytes[key]
                yield entry
            order = rest


class _Refuse(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def acked_now(store, store_id: str) -> int | str:
    """The store's ack for a log line: SQLite's in-memory one, else "(see the database)"."""
    return store.acked_now(store_id) if hasattr(store, "acked_now") else "(see the database)"


def _ignore_cancel(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("hub: ack publish failed: %s", future.exception())


async def serve(config: HubConfig, stop: asyncio.Event) -> None:
    """Open the hub, run it until `stop` is set, close it."""
    service = await HubService.open(config)
    try:
        # Wiring point: extra hub jobs (e.g. the availability publisher) attach to `service` here.
        service.publisher = await AvailabilityPublisher.attach(service)
        HistoryServer.attach(service)
        if config.hub.http_port:
            from sync.hub.ops import OpsServer

            service.jobs.append(OpsServer(service, config.hub.http_host, config.hub.http_port).run)
        await service.run(stop)
    finally:
        await service.close()
