"""The uplink: ship the store's log to the hub in batches; only the hub's ack moves the cursor.

Runs in `edge-agent sync` as the imperative shell around the pure rules of sync/rules.py:
it tells them what happened (the log grew, an ack arrived, the cursor was stored, the
connection changed, a batch left, time passed) and carries out what they decide:

* Batches are consecutive events `first_seq..last_seq` (at most `sync.batch_max_events`
  and `sync.batch_max_bytes`), cut and joined inside SQLite (`LogFeed.batch`) on a
  thread that also builds the payload (`protocol.encode_joined_batch`), and published at
  QoS 1 on `P/stores/{id}/events`, up to `sync.max_inflight` beyond the ack. While acks
  are awaited the next window is read ahead, so a freed window is filled by publishing;
  a resend or a rewind drops what was read ahead. `sync.rate_limit_eps` caps events per
  second (one batch at a time, no read-ahead).
* New events are learned from the log itself: `feed.changed()` (PRAGMA data_version) is
  polled every `sync.poll_interval_s`, then `feed.last_seq()`; the agent sends nothing.
  The feed is used by one thread at a time: the poll skips a round while a read is in flight.
* The cursor lives in sync.db (`SyncState`) and moves only on the hub's ack (a PUBACK
  means nothing here). The ack's (epoch, rev) mark is stored with it; a stale ack (same
  epoch, lower rev: two hub workers' acks crossed) is ignored and counted in sync.db's
  counters as `stale_acks`. It is committed before the ack handler returns, and the MQTT
  adapter acknowledges the ack message only after that.
* The status goes to sync.db at once on a resend, a rewind, an alarm or a connection
  change, otherwise at most every STATUS_EVERY_S while sending.

The app (sync/app.py) builds the client (`agent_mqtt`), the uplink (`await Uplink.open`),
starts the client and runs `uplink.run()`; the uplink never starts or stops the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, NamedTuple

from agent.settings import AgentConfig
from common import clock, faults
from common.aio import wait_for
from sync import protocol, rules
from sync.mqtt import LastWill, Message, MqttClient, MqttError
from sync.ports import LogFeed, SyncState, UplinkStatus
from sync.rules import (AckArrived, Alarm, BatchSent, ConnectionChanged, CursorStored, LogGrew, Note, Send,
                        StoreCursor, Tick)

log = logging.getLogger("edge_sync.uplink")

STATUS_EVERY_S = 0.1
HEADROOM = 320   # bytes around the joined events in a payload (hashes included), below sync.batch_max_bytes


def agent_mqtt(config: AgentConfig) -> MqttClient:
    """Build the store's MQTT client: persistent session, retained status with its will."""
    prefix, store_id = config.mqtt.topic_prefix, config.store.id
    client_id = config.mqtt.client_id or f"edge-agent-{store_id}"
    topic = protocol.status_topic(prefix, store_id)
    accept = [protocol.ZLIB_JSON] if config.mqtt.protocol == 5 else []  # sync/downlink.py reads it
    online = protocol.encode(protocol.Status(store_id=store_id, state="online", client_id=client_id,
                                             accept=accept))
    offline = protocol.encode(protocol.Status(store_id=store_id, state="offline", client_id=client_id))
    return MqttClient.from_settings(config.mqtt, client_id, birth=LastWill(topic, online),
                                    will=LastWill(topic, offline),
                                    max_inflight=max(20, 2 * config.sync.max_inflight))


class Outgoing(NamedTuple):
    """A batch read from the log, its payload built, ready to publish."""

    first_seq: int
    last_seq: int
    count: int
    payload: bytes


def _urgent(status: UplinkStatus) -> tuple:
    """The fields whose change is persisted at once (connection, counters, alarm)."""
    return status.connected, status.resends, status.rewinds, status.ack_alarms, status.alarm


class Uplink:
    """Ships the log; see the module docstring. Build with `await Uplink.open(...)`."""

    def __init__(self, config: AgentConfig, feed: LogFeed, state: SyncState, mqtt: MqttClient, *,
                 acked_seq: int, last_ack_at: str | None,
                 mark: tuple[str | None, int | None] = (None, None),
                 now: Callable[[], str] = clock.utc_now, monotonic: Callable[[], float] = time.monotonic):
        self.store_id = config.store.id
        self.sync = config.sync
        self.feed, self.state, self.mqtt = feed, state, mqtt
        self.limits = rules.Limits(config.sync.max_inflight, config.sync.ack_timeout_s)
        self._now, self._monotonic = now, monotonic
        self.window = rules.start(acked_seq, last_ack_at, feed.last_seq(), monotonic(), *mark)
        self._topic = protocol.events_topic(config.mqtt.topic_prefix, self.store_id)
        self._wake = asyncio.Event()
        self._ready: list[Outgoing] = []                          # read ahead, continuing sent_seq
        self._reading: tuple[int, asyncio.Task] | None = None     # (read after seq, its task)
        self._writes = asyncio.Lock()    # one sync.db write at a time, so statuses land in order
        self._saved: UplinkStatus | None = None
        self._saved_at = float("-inf")
        self._send_at = float("-inf")    # rate limit: no publish before this monotonic time
        # Called with each decoded ack of this store before the rules see it (sync/rehydrate.py
        # records the hub's position even when it is beyond the log).
        self.ack_listeners: list[Callable[[protocol.Ack], Awaitable[None]]] = []
        # Subscribed before the app starts the client: the retained ack comes with the first connect.
        mqtt.subscribe(protocol.ack_topic(config.mqtt.topic_prefix, self.store_id), self.on_ack)
        mqtt.on_connection_change(self._on_connection)

    @classmethod
    async def open(cls, config: AgentConfig, feed: LogFeed, state: SyncState, mqtt: MqttClient,
                   **kwargs) -> "Uplink":
        """Load the cursor from `state`, clamped (and stored) at the log's end when beyond it.

        Raises StorageError when sync.db cannot be read or written.
        """
        acked, at = await state.cursor()
        mark = await state.ack_mark()
        last = feed.last_seq()
        if acked > last:
            log.error("sync: the stored cursor says %d but the log ends at %d (log restored from a"
                      " backup?); starting from the log's end", acked, last)
            # The mark goes with the clamp: the hub's next ack, whatever its rev, is taken.
            acked, mark = last, (None, None)
            await state.store_cursor(acked, at or kwargs.get("now", clock.utc_now)())
        return cls(config, feed, state, mqtt, acked_seq=acked, last_ack_at=at, mark=mark, **kwargs)

    @property
    def acked_seq(self) -> int:
        return self.window.acked_seq

    @property
    def last_ack_at(self) -> str | None:
        return self.window.last_ack_at

    @property
    def last_seq(self) -> int:
        """The log's end as last seen (read without touching the feed)."""
        return self.window.last_seq

    def status(self) -> UplinkStatus:
        """The uplink's diagnostics now (what sync.db's status row holds)."""
        w = self.window
        return UplinkStatus(connected=w.connected, reconnects=self.mqtt.reconnects, sent_seq=w.sent_seq,
                            inflight_batches=len(w.inflight), resends=w.resends, rewinds=w.rewinds,
                            ack_alarms=w.ack_alarms, alarm=w.alarm, events_sent=w.events_sent)

    # ------------------------------------------------------------- the rules

    def _decide(self, message: rules.Message) -> list[rules.Action]:
        """Feed one message to the rules; log their alarms and notes; return every action."""
        self.window, actions = rules.decide(self.window, message, self._monotonic(), self.limits)
        for action in actions:
            if isinstance(action, Alarm):
                log.error("%s", action.text)
            elif isinstance(action, Note):
                log.warning("%s", action.text)
        return actions

    def _on_connection(self, up: bool) -> None:
        self._decide(ConnectionChanged(up))
        self._wake.set()

    async def on_ack(self, message: Message) -> None:
        """Handle the hub's ack; return only after the cursor (and status) are committed.

        Raises StorageError when the write fails: the adapter then leaves the message
        unacknowledged, and its redelivery asks for the write again.
        """
        if not message.payload:
            return  # a cleared retained ack
        try:
            ack = protocol.decode(message.payload, protocol.Ack)
        except protocol.ProtocolError as exc:
            log.warning("sync: ignoring an undecodable ack on %s: %s", message.topic, exc)
            return
        if ack.store_id != self.store_id:
            log.warning("sync: ignoring an ack for store %s on %s", ack.store_id, message.topic)
            return
        stale = self.window.stale_acks
        actions = self._decide(AckArrived(ack.store_id, ack.acked_seq, self._now(), ack.epoch, ack.rev))
        if self.window.stale_acks != stale:
            log.info("sync: ignoring a stale ack %d (epoch %s rev %s; held rev %s): it crossed a newer one",
                     ack.acked_seq, ack.epoch, ack.rev, self.window.rev)
            await self.state.add_counts({"stale_acks": 1})
        else:
            for listener in self.ack_listeners:   # a stale ack says nothing about the hub's record
                await listener(ack)
        self._wake.set()   # the window slid (or was rewound): the loop sends while we write
        for action in actions:
            if isinstance(action, StoreCursor):
                faults.point("sync.before_cursor_save")
                async with self._writes:
                    status = self.status()
                    await self.state.store_cursor(action.acked_seq, action.at, status,
                                                  (action.epoch, action.rev))
                    self._saved, self._saved_at = status, self._monotonic()
                self._decide(CursorStored(action.acked_seq, action.at, action.epoch, action.rev))
        await self._save_status()

    # ------------------------------------------------------------------ send

    def _read(self, after: int, count: int) -> list[Outgoing]:
        """Read up to `count` consecutive batches after `after` (on a thread), payloads built here."""
        out, cap = [], self.sync.batch_max_bytes - HEADROOM
        # The log's incarnation goes in every batch (docs/protocol.md); a feed without one sends none.
        incarnation = self.feed.incarnation() if hasattr(self.feed, "incarnation") else None
        while len(out) < count:
            batch = self.feed.batch(after, self.sync.batch_max_events, cap)
            if batch is None:
                break
            payload = protocol.encode_joined_batch(self.store_id, batch.first_seq, batch.last_seq, batch.bodies,
                                                   batch.prev_hash, batch.last_hash, incarnation)
            out.append(Outgoing(batch.first_seq, batch.last_seq, batch.count, payload))
            after = batch.last_seq
        return out

    def _start_read(self, after: int, count: int) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._read, after, count))
        self._reading = (after, task)

    async def _collect(self) -> None:
        """Wait for the read in flight; keep its batches if they still continue what is ready.

        Raises what the read raised (StorageError).
        """
        if self._reading is None:
            return
        after, task = self._reading
        await asyncio.wait([task])
        self._reading = None
        batches = task.result()
        if (self._ready[-1].last_seq if self._ready else self.window.sent_seq) == after:
            self._ready.extend(batches)

    async def _take(self, after: int, count: int) -> list[Outgoing]:
        """Return up to `count` consecutive batches starting at `after + 1` (read ahead or read now)."""
        await self._collect()
        self._ready = [b for b in self._ready if b.first_seq > after]
        if self._ready and self._ready[0].first_seq != after + 1:
            self._ready.clear()     # a resend or a rewind moved sent_seq back
        if not self._ready:
            self._start_read(after, count)
            await self._collect()
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken

    def _read_ahead(self) -> None:
        """Start reading the batches after the last one sent or ready, while acks are awaited."""
        if self._reading is not None or self.sync.rate_limit_eps or not self.window.connected:
            return
        want = self.limits.max_inflight - len(self._ready)
        after = self._ready[-1].last_seq if self._ready else self.window.sent_seq
        if want > 0 and after < self.window.last_seq:
            self._start_read(after, want)

    async def _send(self, send: Send) -> int:
        """Publish what `send` allows; return how many batches left."""
        rate = self.sync.rate_limit_eps
        batches = await self._take(send.after_seq, 1 if rate else send.batches)
        for i, out in enumerate(batches):
            # An ack may have rewound the cursor while the batches were read.
            if out.first_seq != self.window.sent_seq + 1 or not self.mqtt.connected:
                self._ready[:0] = batches[i:]
                return i
            try:
                self.mqtt.publish(self._topic, out.payload, qos=1).add_done_callback(_quiet)
            except MqttError as exc:
                log.error("sync: could not publish %d..%d: %s", out.first_seq, out.last_seq, exc)
                self._ready[:0] = batches[i:]
                return i
            self._decide(BatchSent(out.first_seq, out.last_seq))
            if rate:
                self._send_at = self._monotonic() + out.count / rate
        return len(batches)

    # ---------------------------------------------------------------- status

    async def _save_status(self) -> None:
        """Persist the status when it changed: urgent fields at once, the rest at most every 100 ms."""
        status = self.status()
        if status == self._saved:
            return
        if (self._saved is not None and _urgent(status) == _urgent(self._saved)
                and self._monotonic() - self._saved_at < STATUS_EVERY_S):
            return
        async with self._writes:
            status = self.status()
            await self.state.store_status(status)
            self._saved, self._saved_at = status, self._monotonic()

    # ------------------------------------------------------------------ loop

    def _poll(self) -> None:
        if self._reading is not None and not self._reading[1].done():
            return    # the feed is busy on the read thread
        if self.feed.changed():
            self._decide(LogGrew(self.feed.last_seq()))

    async def step(self) -> None:
        """One round: look at the log, let the rules decide, send, persist the status, wait."""
        self._wake.clear()
        self._poll()
        actions = self._decide(Tick())
        await self._save_status()          # a resend shows in sync.db before its batches leave
        send = next((a for a in actions if isinstance(a, Send)), None)
        if send is not None and self._monotonic() >= self._send_at:
            if await self._send(send) and any(isinstance(a, Send) for a in self._decide(Tick())):
                self._wake.set()           # room left and more to send: no sleep
        self._read_ahead()
        await self._save_status()
        if not self._wake.is_set():
            await self._sleep()

    async def _sleep(self) -> None:
        now = self._monotonic()
        timeout = self.sync.poll_interval_s
        deadline = rules.next_deadline(self.window, self.limits)
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        if self._send_at > now:
            timeout = min(timeout, self._send_at - now)
        try:
            await wait_for(self._wake.wait(), max(0.0, timeout))
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Ship the log until cancelled (the app starts and stops the MQTT client).

        Raises StorageError when the log or sync.db fails. On the way out it waits for a
        read in flight, so the app may close the feed after this returns.
        """
        self._decide(ConnectionChanged(self.mqtt.connected))
        try:
            while True:
                await self.step()
        finally:
            if self._reading is not None:
                task = self._reading[1]
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()    # retrieved: the loop's own error, if any, is the one raised


def _quiet(future: asyncio.Future) -> None:
    faults.point("sync.after_publish")
    if not future.cancelled() and future.exception() is not None:
        log.warning("sync: publish failed: %s", future.exception())
