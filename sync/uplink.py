"""The uplink: ship the store's log to the hub in batches; only the hub's ack moves the cursor.

Runs inside `edge-agent run`. The rules (docs/protocol.md):

* Batches are consecutive events `first_seq..last_seq` (at most `sync.batch_max_events`
  and `sync.batch_max_bytes`), published at QoS 1 on `P/stores/{id}/events`, with up to
  `sync.max_inflight` batches sent beyond the last ack.
* The cursor (`acked_seq`, `last_ack_at`) lives in the agent's database and moves only
  when the hub's retained ack says so (a PUBACK means nothing here). It is written
  through the log's single writer before the ack message is acknowledged.
* No ack progress for `sync.ack_timeout_s` while events are outstanding: send again from
  `acked_seq + 1`. An ack below the cursor (the hub restored a backup) rewinds it. An ack
  above the log's last seq is an alarm: logged, counted, shown in status, never trusted.

The uplink owns the agent's MQTT client (`uplink.mqtt`, client id `edge-agent-{store_id}`
unless configured) with the retained online/offline status and its will; other agent
parts (the downlink) subscribe on it before `run()` starts it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any, Awaitable, Callable

import msgspec

from common import clock
from common.aio import wait_for
from agent.reader import LogReader
from agent.settings import AgentConfig
from sync import protocol
from sync.mqtt import LastWill, Message, MqttClient, MqttError

log = logging.getLogger("edge_agent.uplink")

CURSOR_SQL = """
CREATE TABLE IF NOT EXISTS sync_cursor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    acked_seq   INTEGER NOT NULL,
    last_ack_at TEXT
);
"""


def _load_cursor(conn: sqlite3.Connection) -> tuple[int, str | None]:
    conn.execute(CURSOR_SQL)
    row = conn.execute("SELECT acked_seq, last_ack_at FROM sync_cursor WHERE id = 1").fetchone()
    return (row[0], row[1]) if row else (0, None)


def store_cursor(conn: sqlite3.Connection, seq: int, at: str) -> None:
    """Write the cursor (on the log's writer connection, inside its transaction)."""
    conn.execute("INSERT INTO sync_cursor(id, acked_seq, last_ack_at) VALUES (1, ?, ?)"
                 " ON CONFLICT(id) DO UPDATE SET acked_seq = excluded.acked_seq,"
                 " last_ack_at = excluded.last_ack_at", (seq, at))


async def load_cursor(event_log) -> tuple[int, str | None]:
    """Create the cursor table if needed and return (acked_seq, last_ack_at), clamped to the log."""
    acked, at = await event_log.write(_load_cursor)
    if acked > event_log.last_seq:
        log.error("sync: the stored cursor says %d but the log ends at %d (restored from a backup?);"
                  " starting from the log's end", acked, event_log.last_seq)
        acked = event_log.last_seq
    return acked, at


def agent_mqtt(config: AgentConfig) -> MqttClient:
    """Build the agent's MQTT client: persistent session, retained status with its will."""
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


class UplinkState(msgspec.Struct, tag="state"):
    """The uplink's diagnostics; the sync worker sends them to the agent as a frame."""

    connected: bool = False
    reconnects: int = 0
    sent_seq: int = 0
    inflight_batches: int = 0
    resends: int = 0
    rewinds: int = 0
    ack_alarms: int = 0
    alarm: str | None = None
    events_sent: int = 0


def status_answer(last_seq: int, acked_seq: int, last_ack_at: str | None, snapshot_version: int | None,
                  state: UplinkState) -> dict:
    """The GET /v1/sync answer: the contract's keys first, then the uplink's diagnostics."""
    return {
        "last_seq": last_seq, "acked_seq": acked_seq, "backlog": max(0, last_seq - acked_seq),
        "connected": state.connected, "last_ack_at": last_ack_at, "snapshot_version": snapshot_version,
        "sent_seq": state.sent_seq, "inflight_batches": state.inflight_batches,
        "reconnects": state.reconnects, "resends": state.resends, "rewinds": state.rewinds,
        "ack_alarms": state.ack_alarms, "alarm": state.alarm,
    }


class Uplink:
    """Ships the log; see the module docstring. Build with `await Uplink.open(...)`."""

    def __init__(self, config: AgentConfig, event_log, mqtt: MqttClient, *,
                 acked_seq: int = 0, last_ack_at: str | None = None,
                 store_cursor: Callable[[int, str], Awaitable[None]] | None = None,
                 on_change: Callable[[], None] | None = None,
                 now: Callable[[], str] = clock.utc_now, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.log = event_log
        self.mqtt = mqtt
        self.store_id = config.store.id
        self.prefix = config.mqtt.topic_prefix
        self.sync = config.sync
        self.acked_seq = acked_seq
        self.last_ack_at = last_ack_at
        self.sent_seq = acked_seq
        self.resends = 0
        self.rewinds = 0
        self.ack_alarms = 0
        self.alarm: str | None = None
        self.batches_sent = 0
        self.events_sent = 0
        self.snapshot_version: Callable[[], int | None] = lambda: None
        self._now, self._monotonic = now, monotonic
        # Where the cursor is made durable: the log's writer here, or the agent process
        # when this uplink runs in the sync worker (sync/worker.py).
        self._store_cursor = store_cursor or self._write_cursor
        # Called when the status changed (the sync worker sends it to the agent then, so a
        # resend or a rewind shows in GET /v1/sync before its batches leave).
        self._changed = on_change or (lambda: None)
        self._inflight: list[int] = []          # last seq of each batch beyond the ack
        self._progress_at = monotonic()
        self._wake = asyncio.Event()
        self._reader: LogReader | None = None
        # Read-ahead: batches after the last one sent, read while acks are awaited, so an ack
        # that frees the window is answered with a publish, not with a read of the log first.
        self._ready: list[tuple[int, int, int, bytes]] = []
        self._reading: tuple[int, asyncio.Task] | None = None   # (read after seq, its task)
        self._topic = protocol.events_topic(self.prefix, self.store_id)
        event_log.add_listener(lambda events: self._wake.set())
        mqtt.subscribe(protocol.ack_topic(self.prefix, self.store_id), self.on_ack)
        mqtt.on_connection_change(lambda up: self._wake.set())

    @classmethod
    async def open(cls, config: AgentConfig, event_log, mqtt: MqttClient | None = None,
                   metrics: Any = None, **kwargs) -> "Uplink":
        """Create the cursor table if needed, load the cursor, build the uplink.

        `metrics`: an agent.metrics.Metrics whose registry gets the sync metrics.
        """
        acked, at = await load_cursor(event_log)
        uplink = cls(config, event_log, mqtt or agent_mqtt(config), acked_seq=acked, last_ack_at=at, **kwargs)
        if metrics is not None:
            register_metrics(uplink, metrics.registry)
        return uplink

    # ------------------------------------------------------------------ status

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def state(self) -> "UplinkState":
        """The uplink's diagnostics now (what the sync worker sends to the agent)."""
        return UplinkState(self.mqtt.connected, self.mqtt.reconnects, self.sent_seq, len(self._inflight),
                           self.resends, self.rewinds, self.ack_alarms, self.alarm, self.events_sent)

    @property
    def idle(self) -> bool:
        """Nothing in flight and everything the log holds sent."""
        return not self._inflight and self.sent_seq >= self.log.last_seq

    def status(self) -> dict:
        """The GET /v1/sync answer (the contract's keys first, then diagnostics)."""
        return status_answer(self.log.last_seq, self.acked_seq, self.last_ack_at,
                             self.snapshot_version(), self.state())

    # --------------------------------------------------------------------- acks

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
        # In the sync worker `log.last_seq` is the agent's last notice, which may trail what
        # this uplink already read and sent; never below what was sent.
        seq, last = ack.acked_seq, max(self.log.last_seq, self.sent_seq)
        if seq > last:
            self.ack_alarms += 1
            self.alarm = (f"sync: ack for {self.store_id} says {seq} but the log ends at {last};"
                          " not trusted")
            log.error("%s", self.alarm)
            self._changed()
            return
        at = self._now()
        if seq > self.acked_seq:
            # Slide the send window at once; the cursor itself moves after the write below.
            self._inflight = [s for s in self._inflight if s > seq]
            self._progress_at = self._monotonic()
            self._wake.set()
        if seq != self.acked_seq:
            await self._store_cursor(seq, at)
        self._advance(seq, at)

    async def _write_cursor(self, seq: int, at: str) -> None:
        await self.log.write(lambda conn: store_cursor(conn, seq, at))

    def _advance(self, seq: int, at: str) -> None:
        if seq < self.acked_seq:
            self.rewinds += 1
            log.warning("sync: the hub acks %d, below our cursor %d (hub restored?); rewinding",
                        seq, self.acked_seq)
            self.sent_seq = seq
            self._inflight.clear()
        if seq != self.acked_seq:
            self._progress_at = self._monotonic()
        self.acked_seq, self.last_ack_at = seq, at
        self.sent_seq = max(self.sent_seq, seq)
        self._inflight = [s for s in self._inflight if s > seq]
        self._changed()
        self._wake.set()

    # --------------------------------------------------------------------- send

    def _read_batches(self, after: int, count: int) -> list[tuple[int, int, int, bytes]]:
        """Read up to `count` consecutive batches after `after` (on a worker thread).

        Returns (first_seq, last_seq, events, payload) each, the payload built here so the
        event loop only publishes it. SQLite cuts and joins each batch
        (LogReader.joined_batch), so this thread barely holds the interpreter lock.
        """
        max_events, cap = self.sync.batch_max_events, self.sync.batch_max_bytes - 128
        out = []
        while len(out) < count:
            batch = self._reader.joined_batch(after, max_events, cap)
            if batch is None:
                break
            last, events, joined = batch
            out.append((after + 1, last, events,
                        protocol.encode_joined_batch(self.store_id, after + 1, last, joined)))
            after = last
        return out

    async def _take(self, count: int) -> list[tuple[int, int, int, bytes]]:
        """Return up to `count` consecutive batches starting at `sent_seq + 1`.

        From the read-ahead when it starts there (it is dropped when it does not: a
        resend or a rewind moved `sent_seq` back); otherwise read now.
        """
        await self._collect()
        after = self.sent_seq
        while self._ready and self._ready[0][0] <= after:
            self._ready.pop(0)
        if self._ready and self._ready[0][0] != after + 1:
            self._ready.clear()
        if not self._ready:
            return await asyncio.to_thread(self._read_batches, after, count)
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken

    async def _collect(self) -> None:
        """Wait for a running read-ahead; keep its batches if they still continue `_ready`."""
        if self._reading is None:
            return
        after, task = self._reading
        await asyncio.wait([task])
        self._reading = None
        if not task.cancelled() and task.exception() is None:
            if (self._ready[-1][1] if self._ready else self.sent_seq) == after:
                self._ready.extend(task.result())

    def _read_ahead(self) -> None:
        want = self.sync.max_inflight - len(self._ready)
        after = self._ready[-1][1] if self._ready else self.sent_seq
        if self._reading is not None or want <= 0 or after >= self.log.last_seq or self.sync.rate_limit_eps:
            return
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._read_batches, after, want))
        self._reading = (after, task)

    async def _send_window(self) -> None:
        rate = self.sync.rate_limit_eps
        while (self.mqtt.connected and self.sent_seq < self.log.last_seq
               and len(self._inflight) < self.sync.max_inflight):
            free = 1 if rate else self.sync.max_inflight - len(self._inflight)
            batches = await self._take(free)
            if not batches:
                return
            for first, last, count, payload in batches:
                # An ack may have rewound the cursor while the batches were read: start over then.
                if first != self.sent_seq + 1 or not self.mqtt.connected:
                    return
                try:
                    self.mqtt.publish(self._topic, payload, qos=1).add_done_callback(_quiet)
                except MqttError as exc:
                    log.error("sync: could not publish %d..%d: %s", first, last, exc)
                    return
                if not self._inflight:
                    self._progress_at = self._monotonic()
                self._inflight.append(last)
                self.sent_seq = last
                self.batches_sent += 1
                self.events_sent += count
                if rate:
                    await asyncio.sleep(count / rate)
        if self.mqtt.connected:
            self._read_ahead()

    def _check_timeout(self) -> None:
        if self._inflight and self._monotonic() - self._progress_at >= self.sync.ack_timeout_s:
            self.resends += 1
            log.warning("sync: no ack progress for %.1fs (acked %d, sent %d); sending again from %d",
                        self.sync.ack_timeout_s, self.acked_seq, self.sent_seq, self.acked_seq + 1)
            self.sent_seq = self.acked_seq
            self._inflight.clear()
            self._progress_at = self._monotonic()
            self._changed()

    async def step(self) -> None:
        """One round: resend on timeout, fill the window, then wait for something to happen."""
        self._check_timeout()
        self._wake.clear()
        await self._send_window()
        if self._wake.is_set():
            return
        timeout = self.sync.ack_timeout_s if self._inflight else None
        if timeout is not None:
            timeout = max(0.01, self._progress_at + timeout - self._monotonic())
        try:
            await wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def run(self) -> None:
        """Connect and ship the log until cancelled; then publish offline and disconnect."""
        self._reader = LogReader(self.log.path)
        await self.mqtt.start()
        try:
            while True:
                await self.step()
        finally:
            if self._reading is not None:
                await asyncio.wait([self._reading[1]])  # its thread must be done with the connection
            await asyncio.shield(self.mqtt.stop())
            self._reader.close()


def _quiet(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sync: publish failed: %s", future.exception())


def register_metrics(uplink: Uplink, registry) -> None:
    """Expose the uplink's state on a prometheus registry (read at scrape time)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            s = uplink.status()
            for name, value, text in (
                    ("edge_agent_sync_backlog", s["backlog"], "Events not yet acked by the hub."),
                    ("edge_agent_sync_acked_seq", s["acked_seq"], "The hub's last ack (the cursor)."),
                    ("edge_agent_sync_sent_seq", s["sent_seq"], "The last seq published."),
                    ("edge_agent_sync_connected", int(s["connected"]), "1 when connected to the broker."),
                    ("edge_agent_sync_last_ack_timestamp_seconds",
                     clock.parse_rfc3339(s["last_ack_at"]) if s["last_ack_at"] else 0,
                     "When the last ack arrived (Unix time; 0: never).")):
                yield GaugeMetricFamily(name, text, value=value)
            for name, value, text in (
                    ("edge_agent_sync_reconnects", s["reconnects"], "Reconnects to the broker."),
                    ("edge_agent_sync_resends", s["resends"], "Resends after an ack timeout."),
                    ("edge_agent_sync_rewinds", s["rewinds"], "Acks below the cursor (cursor rewound)."),
                    ("edge_agent_sync_ack_alarms", s["ack_alarms"], "Acks above the log's end (ignored)."),
                    ("edge_agent_sync_events_sent", uplink.events_sent, "Events published (resends included).")):
                yield CounterMetricFamily(name, text, value=value)

    registry.register(_Collector())
