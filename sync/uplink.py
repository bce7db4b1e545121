"""The uplink: ship the store's log to the hub in batches; only the hub's ack moves the cursor.

Runs in `edge-agent sync`, as the imperative shell around the pure rules of
sync/rules.py: it feeds them what happens (the log grew, an ack arrived, the connection
changed, a batch left, time passed) and carries out what they decide:

* Batches are consecutive events `first_seq..last_seq` (at most `sync.batch_max_events`
  and `sync.batch_max_bytes`), cut and joined inside SQLite (sync/feed.py) on a thread,
  published at QoS 1 on `P/stores/{id}/events`, up to `sync.max_inflight` beyond the ack.
* The cursor lives in sync.db (sync/state.py) and moves only when the hub's retained ack
  says so (a PUBACK means nothing here); it is durable before the ack message is
  acknowledged (the MQTT adapter acks after the handler returns).
* New events are learned from the log itself: `feed.changed()` (PRAGMA data_version) is
  polled every `sync.poll_interval_s`; the agent sends no message.
* The status (connected, counters, alarm) goes to sync.db at once on a resend, rewind,
  alarm or connection change, otherwise at most every STATUS_EVERY_S while sending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import astuple
from typing import Callable

from agent.settings import AgentConfig
from common import clock
from common.aio import wait_for
from sync import protocol
from sync.mqtt import LastWill, Message, MqttClient, MqttError
from sync.ports import LogFeed, SyncState, UplinkStatus
from sync.rules import (AckArrived, Alarm, BatchSent, ConnectionChanged, Limits, LogGrew, Note, Send,
                        StoreCursor, Tick, Window, decide, next_deadline)

log = logging.getLogger("edge_sync.uplink")

STATUS_EVERY_S = 0.1


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


class Uplink:
    """Ships the log; see the module docstring. Build with `await Uplink.open(...)`."""

    def __init__(self, config: AgentConfig, feed: LogFeed, state: SyncState, mqtt: MqttClient, *,
                 acked_seq: int = 0, last_ack_at: str | None = None,
                 now: Callable[[], str] = clock.utc_now, monotonic: Callable[[], float] = time.monotonic):
        self.store_id = config.store.id
        self.sync = config.sync
        self.feed, self.state, self.mqtt = feed, state, mqtt
        self.limits = Limits(config.sync.max_inflight, config.sync.ack_timeout_s)
        self._now, self._monotonic = now, monotonic
        self.window = Window(acked_seq=acked_seq, sent_seq=acked_seq, last_seq=max(acked_seq, feed.last_seq()),
                             progress_at=monotonic())
        self.last_ack_at = last_ack_at
        self.events_sent = 0
        self._topic = protocol.events_topic(config.mqtt.topic_prefix, self.store_id)
        self._wake = asyncio.Event()
        self._saved: tuple | None = None
        self._saved_at = 0.0
        mqtt.subscribe(protocol.ack_topic(config.mqtt.topic_prefix, self.store_id), self.on_ack)
        mqtt.on_connection_change(self._on_connection)

    @classmethod
    async def open(cls, config: AgentConfig, feed: LogFeed, state: SyncState, mqtt: MqttClient,
                   **kwargs) -> "Uplink":
        """Load the cursor from `state`, clamped to the log's end (a log restored from a backup)."""
        acked, at = await state.cursor()
        last = feed.last_seq()
        if acked > last:
            log.error("sync: the stored cursor says %d but the log ends at %d (restored from a backup?);"
                      " starting from the log's end", acked, last)
            acked = last
        return cls(config, feed, state, mqtt, acked_seq=acked, last_ack_at=at, **kwargs)

    @property
    def acked_seq(self) -> int:
        return self.window.acked_seq

    def status(self) -> UplinkStatus:
        w = self.window
        return UplinkStatus(connected=w.connected, reconnects=self.mqtt.reconnects, sent_seq=w.sent_seq,
                            inflight_batches=len(w.inflight), resends=w.resends, rewinds=w.rewinds,
                            ack_alarms=w.ack_alarms, alarm=w.alarm, events_sent=self.events_sent)

    # ------------------------------------------------------------- the rules

    def _decide(self, message) -> list:
        """Feed one message to the rules; log what they note; return the other actions."""
        self.window, actions = decide(self.window, message, self._monotonic(), self.limits)
        rest = []
        for action in actions:
            if isinstance(action, Alarm):
                log.error("%s", action.text)
            elif isinstance(action, Note):
                log.warning("%s", action.text)
            else:
                rest.append(action)
        return rest

    def _on_connection(self, up: bool) -> None:
        self._decide(ConnectionChanged(up))
        self._wake.set()

    async def on_ack(self, message: Message) -> None:
        """Handle the hub's ack; returns after the cursor is durably written (then it is acked)."""
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
        for action in self._decide(AckArrived(ack.store_id, ack.acked_seq)):
            if isinstance(action, StoreCursor):
                at = self._now()
                await self.state.store_cursor(action.acked_seq, at, self.status())
                self.last_ack_at = at
                self._mark_saved()
        await self._save_status()
        self._wake.set()

    # ------------------------------------------------------------------ send

    def _read(self, after: int, count: int) -> list:
        """Read up to `count` consecutive batches after `after` (on a thread); payloads built here."""
        out, cap = [], self.sync.batch_max_bytes - 128
        while len(out) < count:
            batch = self.feed.batch(after, self.sync.batch_max_events, cap)
            if batch is None:
                break
            out.append((batch.first_seq, batch.last_seq, batch.count,
                        protocol.encode_joined_batch(self.store_id, batch.first_seq, batch.last_seq, batch.bodies)))
            after = batch.last_seq
        return out

    async def _send(self, action: Send) -> None:
        rate = self.sync.rate_limit_eps
        batches = await asyncio.to_thread(self._read, action.after_seq, 1 if rate else action.batches)
        for first, last, count, payload in batches:
            # An ack may have rewound the cursor while the batches were read: start over then.
            if first != self.window.sent_seq + 1 or not self.mqtt.connected:
                return
            try:
                self.mqtt.publish(self._topic, payload, qos=1).add_done_callback(_quiet)
            except MqttError as exc:
                log.error("sync: could not publish %d..%d: %s", first, last, exc)
                return
            self._decide(BatchSent(first, last))
            self.events_sent += count
            if rate:
                await asyncio.sleep(count / rate)

    # -------------------------------------------------------------- status

    def _mark_saved(self) -> None:
        self._saved, self._saved_at = astuple(self.status()), self._monotonic()

    async def _save_status(self) -> None:
        status = self.status()
        now = astuple(status)
        if now == self._saved:
            return
        old = self._saved
        urgent = old is None or now[0] != old[0] or now[4:8] != old[4:8]   # connection, counters, alarm
        if urgent or self._monotonic() - self._saved_at >= STATUS_EVERY_S:
            await self.state.store_status(status)
            self._saved, self._saved_at = now, self._monotonic()

    # ----------------------------------------------------------------- loop

    async def step(self) -> None:
        """One round: look at the log, let the rules decide, send, save the status, wait."""
        if self.feed.changed():
            self._decide(LogGrew(self.feed.last_seq()))
        self._wake.clear()
        for action in self._decide(Tick()):
            if isinstance(action, Send):
                await self._send(action)
        await self._save_status()
        if self._wake.is_set():
            return
        timeout = self.sync.poll_interval_s
        deadline = next_deadline(self.window, self.limits)
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - self._monotonic()))
        try:
            await wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Ship the log until cancelled (the app starts and stops the MQTT client)."""
        self._decide(ConnectionChanged(self.mqtt.connected))
        while True:
            await self.step()


def _quiet(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sync: publish failed: %s", future.exception())
