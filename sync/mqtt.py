"""The MQTT adapter: the only module that imports paho (paho-mqtt 2.x, callback API v2).

paho's network loop runs in its own thread (`loop_start`); every callback hops to the
asyncio loop with `call_soon_threadsafe`, so handlers, futures and state live on the loop.

What `MqttClient` gives its users:

* `publish(topic, payload, qos=1, retain=False) -> asyncio.Future`: resolves (to None)
  when the broker acknowledges a QoS 1 message (PUBACK), at once for QoS 0; fails with
  MqttError when paho refuses it or the broker's PUBACK carries a failure reason code.
  Publishing while disconnected is allowed: paho queues the message and sends it after
  the reconnect. A future may stay pending forever if the client is stopped first, so
  callers that need progress use their own timeouts (the uplink does).
* `subscribe(topic_filter, handler, qos=1, concurrent=False)`: `await handler(message)`
  for every message matching the filter (the filter is re-subscribed on every connect).
  Incoming QoS 1 messages are acknowledged manually, only after the handler returns
  (do your commit inside it). A handler that raises is logged and its message is NOT
  acknowledged: the broker redelivers it after the reconnect. A message is never
  acknowledged on a later connection than the one that brought it (packet ids are per
  connection). By default a subscription's messages are handled one at a time in arrival
  order; `concurrent=True` starts each handler as its own task at once, in arrival order
  (for handlers that queue work for a group commit before their first await).
  A message matching several filters goes to the first subscription that matches.
* `on_connection_change(fn)`: `fn(connected: bool)` on the loop after each change.
* `alarm` / `on_alarm(fn)`: why the link cannot work as configured (sync/tls.py's
  `LinkAlarm`: a TLS file missing, unreadable, not PEM or not matching, our client
  certificate expired, the broker's certificate not trusted, for another host or expired,
  our client certificate or credentials refused), or None; `fn(alarm, since)` on the loop
  at each change. A link that is merely down (refused, reset, timed out) is no alarm.
  With TLS, the files are checked at `start()` and before every connect attempt (read
  again when they change), so a fixed file heals the link on the next attempt; a failing
  attempt backs off like any other, never raises out of the client.
* `start()` / `stop()` / `run()`: connect in the background with reconnect (exponential
  backoff with full jitter between `reconnect_min_s` and `reconnect_max_s`); `run()`
  starts, waits until cancelled, then stops.

Sessions are persistent: a fixed client id, MQTT 5 `clean_start=False` with a session
expiry interval, or MQTT 3.1.1 `clean_session=False`. `birth` is published (retained,
QoS 1) on every connect; `will` is registered as the last will, and `stop()` publishes
it itself before a clean disconnect (a clean disconnect does not fire the will).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import clock
from common.aio import wait_for
from sync import tls as tlscheck
from sync.tls import CONFIG, LinkAlarm, TlsFiles, TlsLink

log = logging.getLogger("edge_sync.mqtt")

Handler = Callable[["Message"], Awaitable[None]]
SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttError(Exception):
    """The broker or the client library refused an operation; the message says which and why."""


@dataclass(frozen=True)
class Message:
    """One received message. `payload` is the raw bytes as published."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    content_type: str | None = None   # MQTT 5 Content Type property, when the publisher set one


@dataclass(frozen=True)
class LastWill:
    """A retained status message: published on connect (birth) or as the will."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class _Subscription:
    topic_filter: str
    handler: Handler
    qos: int
    concurrent: bool
    queue: asyncio.Queue | None = None
    worker: asyncio.Task | None = None

    @property
    def matches(self) -> str:
        """The filter messages are matched against: a shared one (`$share/{group}/F`) delivers on F's topics."""
        if self.topic_filter.startswith("$share/"):
            return self.topic_filter.split("/", 2)[2] if self.topic_filter.count("/") >= 2 else ""
        return self.topic_filter


class MqttClient:
    """An asyncio face on one paho client. Create, `subscribe`, then `start` (or `run`)."""

    def __init__(self, *, host: str, port: int, client_id: str, protocol: int = 5,
                 username: str = "", password: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", keepalive_s: int = 30, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, birth: LastWill | None = None,
                 will: LastWill | None = None, max_inflight: int = 64,
                 max_queued: int = 0, session_expiry_s: int = SESSION_EXPIRY_S):
        if protocol not in (4, 5):
            raise ValueError(f"mqtt: protocol must be 4 (3.1.1) or 5, not {protocol!r}")
        self.host, self.port, self.client_id, self.protocol = host, port, client_id, protocol
        self._keepalive = keepalive_s
        self.session_expiry_s = session_expiry_s
        self._backoff = (reconnect_min_s, max(reconnect_min_s, reconnect_max_s))
        self._attempt = 0
        self._birth, self._will = birth, will
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: list[_Subscription] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._generation = 0
        self._started = False
        self._handler_tasks: set[asyncio.Task] = set()
        # SUBACK bookkeeping, touched from paho's thread: a SUBACK may arrive before its mid
        # is recorded, so "all acknowledged" is `sent <= acked`, not a set of pending mids.
        self._subs_sent: set[int] = set()
        self._subs_acked: set[int] = set()
        self._subs_changed: asyncio.Event | None = None
        self.connected = False
        self.connects = 0
        self.reconnects = 0
        self.last_error: str | None = None
        v5 = protocol == 5
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False, manual_ack=True)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(max_queued)
        if username:
            self._client.username_pw_set(username, password or None)
        self.alarm: LinkAlarm | None = None
        self.alarm_since: str | None = None
        self._alarm_listeners: list[Callable[[LinkAlarm | None, str | None], None]] = []
        self._tls: TlsLink | None = None
        if tls_ca or tls_cert or tls_key:
            # Files are read at start() and before each attempt, never here: a missing
            # file is an alarm to heal, not a constructor that raises.
            self._tls = TlsLink(TlsFiles(tls_ca, tls_cert, tls_key), host, port, self._tls_failed)
            self._client.tls_set_context(self._tls)   # type: ignore[arg-type]  (duck-typed context)
            self._client.on_pre_connect = self._on_pre_connect
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_socket_open = self._on_socket_open
        self._set_delay()

    @classmethod
    def from_settings(cls, mqtt, client_id: str, **kwargs) -> "MqttClient":
        """Build from an `agent.settings.MqttSection` (the agent's and the hub's `[mqtt]`).

        `mqtt.session_expiry_s` (when set) overrides a `session_expiry_s` passed here.
        """
        if getattr(mqtt, "session_expiry_s", 0):
            kwargs["session_expiry_s"] = mqtt.session_expiry_s
        return cls(host=mqtt.host, port=mqtt.port, client_id=mqtt.client_id or client_id,
                   protocol=mqtt.protocol, username=mqtt.username, password=mqtt.secret(),
                   tls_ca=mqtt.tls_ca, tls_cert=mqtt.tls_cert, tls_key=mqtt.tls_key,
                   keepalive_s=mqtt.keepalive_s, reconnect_min_s=mqtt.reconnect_min_s,
                   reconnect_max_s=mqtt.reconnect_max_s, **kwargs)

    # ---------------------------------------------------------------- public API

    def on_connection_change(self, fn: Callable[[bool], None]) -> None:
        """Call `fn(connected)` on the event loop after every connect and disconnect."""
        self._listeners.append(fn)

    def on_alarm(self, fn: Callable[[LinkAlarm | None, str | None], None]) -> None:
        """Call `fn(alarm, since)` on the event loop when the link's alarm changes (None: cleared)."""
        self._alarm_listeners.append(fn)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1,
                  concurrent: bool = False) -> None:
        """Route messages matching `topic_filter` to `handler` (see the module docstring).

        May be called before or after `start`; takes effect at once when connected.
        """
        sub = _Subscription(topic_filter, handler, qos, concurrent)
        self._subs.append(sub)
        if self._loop is not None:
            self._start_worker(sub)
        if self.connected:
            self._subs_sent.add(self._client.subscribe(topic_filter, qos)[1])

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                content_type: str | None = None) -> asyncio.Future:
        """Publish; return a future resolved on PUBACK (QoS 1) or once handed to paho (QoS 0).

        Must be called on the event loop. Raises MqttError at once when paho refuses the
        message outright (too large, queue full, bad topic), or for a `content_type`
        (an MQTT 5 property) on an MQTT 3.1.1 connection.
        """
        loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        props = None
        if content_type is not None:
            if self.protocol != 5:
                raise MqttError(f"mqtt: publish to {topic}: a content type needs MQTT 5")
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        try:
            info = self._client.publish(topic, payload, qos, retain, properties=props)
        except ValueError as exc:
            raise MqttError(f"mqtt: publish to {topic}: {exc}") from None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"mqtt: publish to {topic}: {paho.error_string(info.rc)}")
        if qos == 0:
            future.set_result(None)
        else:
            # The PUBACK callback reaches the loop through call_soon_threadsafe, so it
            # cannot run before this registration even if the broker answers at once.
            self._pending[info.mid] = future
        return future

    async def start(self) -> None:
        """Start connecting in the background (paho's thread); return at once."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        if self._tls is not None:
            self._set_alarm(self._tls.check())
        for sub in self._subs:
            self._start_worker(sub)
        props = None
        kwargs: dict = {}
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            kwargs["clean_start"] = False
        self._client.connect_async(self.host, self.port, self._keepalive, properties=props, **kwargs)
        self._client.loop_start()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; raises TimeoutError after `timeout` seconds."""
        if self.connected:
            return
        event = asyncio.Event()

        def seen(up: bool) -> None:
            if up:
                event.set()

        self._listeners.append(seen)
        try:
            await wait_for(event.wait(), timeout)
        finally:
            self._listeners.remove(seen)

    @property
    def subscribed(self) -> bool:
        """True when connected and the broker acknowledged every subscription of this connection."""
        return self.connected and self._subs_sent <= self._subs_acked

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until connected with every subscription acknowledged (SUBACK).

        Until then a message published by someone else may not reach our handlers.
        Raises TimeoutError after `timeout` seconds.
        """
        async def settled() -> None:
            while not self.subscribed:
                if self._subs_changed is None:
                    self._subs_changed = asyncio.Event()
                self._subs_changed.clear()
                await self._subs_changed.wait()

        await wait_for(settled(), timeout)

    async def stop(self, timeout: float = 2.0) -> None:
        """Publish the will as a clean goodbye (when connected), disconnect, stop the thread."""
        if not self._started:
            return
        self._started = False
        if self.connected and self._will is not None:
            try:
                await wait_for(self.publish(self._will.topic, self._will.payload,
                                            self._will.qos, self._will.retain), timeout)
            except (asyncio.TimeoutError, MqttError) as exc:
                log.warning("mqtt %s: could not publish the offline status: %s", self.client_id, exc)
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        self._set_connected(False)
        for sub in self._subs:
            if sub.worker is not None:
                sub.worker.cancel()
        for task in list(self._handler_tasks):
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()

    async def run(self) -> None:
        """Start, stay connected (reconnecting as needed) until cancelled, then stop."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    # ------------------------------------------------------------ paho's thread

    def _call(self, fn, *args) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            # Don't try to be creative here, the event loop may have already been closed.
            pass

    def _set_delay(self) -> None:
        low, high = self._backoff
        delay = random.uniform(low, min(high, low * 2 ** min(self._attempt, 20)))
        self._attempt += 1
        self._client.reconnect_delay_set(delay, delay)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            self._set_delay()
            alarm = tlscheck.refused(reason_code.value, str(reason_code), self.host, self.port)
            if alarm is not None:
                self._call(self._set_alarm, alarm)   # logged once, as the alarm
            else:
                log.warning("mqtt %s: %s:%s refused the connection: %s",
                            self.client_id, self.host, self.port, reason_code)
            return
        self._call(self._set_alarm, None)
        self._attempt = 0
        self._set_delay()
        self._subs_sent = {client.subscribe(sub.topic_filter, sub.qos)[1] for sub in self._subs}
        if self._birth is not None:
            client.publish(self._birth.topic, self._birth.payload, self._birth.qos, self._birth.retain)
        self._call(self._connected_now, flags.session_present)

    def _on_socket_open(self, client, userdata, sock) -> None:
        # Nagle's algorithm holds a small packet (an ack, a PUBACK) while a previous one is
        # unacknowledged, and the peer delays its TCP ACK by up to 40 ms: every ack of the
        # sync protocol would wait that long. Send small packets at once.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (e.g. a Unix socket): nothing to tune

    def _on_pre_connect(self, client, userdata) -> None:
        assert self._tls is not None
        self._call(self._config_checked, self._tls.check())

    def _tls_failed(self, exc: BaseException) -> None:
        alarm = tlscheck.classify(exc, self.host, self.port)
        if alarm is not None:
            self._call(self._set_alarm, alarm)

    def _on_connect_fail(self, client, userdata) -> None:
        self._set_delay()
        self._call(self._note_error, f"cannot connect to {self.host}:{self.port}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._set_delay()
        self._call(self._set_connected, False)
        if self._started:
            self._call(self._note_error, f"disconnected: {reason_code}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._subs_acked.add(mid)
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self._call(self._note_error, f"subscription refused by the broker: {', '.join(refused)}")
        self._call(self._note_subscriptions)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._call(self._puback, mid, reason_code.is_failure, str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        content_type = getattr(getattr(msg, "properties", None), "ContentType", None)
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup),
                          content_type or None)
        self._call(self._dispatch, message, msg.mid)

    # -------------------------------------------------------------- on the loop

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("mqtt %s: %s", self.client_id, text)
        self.last_error = text

    def _config_checked(self, alarm: LinkAlarm | None) -> None:
        if alarm is not None:
            self._set_alarm(alarm)
        elif self.alarm is not None and self.alarm.kind == CONFIG:
            self._set_alarm(None)   # the files check out now; what the broker says comes next

    def _set_alarm(self, alarm: LinkAlarm | None) -> None:
        if alarm == self.alarm:
            return
        if alarm is None:
            log.warning("mqtt %s: alarm %s cleared", self.client_id, self.alarm.code if self.alarm else "")
            self.alarm_since = None
        else:
            log.error("mqtt %s: ALARM %s: %s", self.client_id, alarm.code, alarm.message)
            if self.alarm is None or self.alarm.code != alarm.code:
                self.alarm_since = clock.utc_now()
        self.alarm = alarm
        for fn in list(self._alarm_listeners):
            fn(alarm, self.alarm_since)

    def _note_subscriptions(self) -> None:
        if self._subs_changed is not None:
            self._subs_changed.set()

    def _connected_now(self, session_present: bool) -> None:
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.last_error = None
        log.info("mqtt %s: connected to %s:%s (session present: %s)",
                 self.client_id, self.host, self.port, session_present)
        self._generation += 1
        self.connected = True
        self._note_subscriptions()
        for fn in list(self._listeners):
            fn(True)

    def _set_connected(self, up: bool) -> None:
        if up == self.connected:
            return
        self.connected = up
        self._generation += 1
        for fn in list(self._listeners):
            fn(up)

    def _puback(self, mid: int, failed: bool, reason: str) -> None:
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if failed:
            future.set_exception(MqttError(f"mqtt: the broker refused message {mid}: {reason}"))
        else:
            future.set_result(None)

    def _start_worker(self, sub: _Subscription) -> None:
        if sub.concurrent or sub.worker is not None:
            return
        sub.queue = asyncio.Queue()
        sub.worker = asyncio.get_running_loop().create_task(
            self._work(sub), name=f"mqtt-sub:{sub.topic_filter}")

    def _dispatch(self, message: Message, mid: int) -> None:
        generation = self._generation
        for sub in self._subs:
            if paho.topic_matches_sub(sub.matches, message.topic):
                break
        else:
            log.warning("mqtt %s: message on %s matches no subscription; acknowledged and dropped",
                        self.client_id, message.topic)
            self._ack(mid, message.qos, generation)
            return
        if sub.concurrent:
            task = asyncio.get_running_loop().create_task(self._handle(sub, message, mid, generation))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)
        else:
            assert sub.queue is not None
            sub.queue.put_nowait((message, mid, generation))

    async def _work(self, sub: _Subscription) -> None:
        assert sub.queue is not None
        while True:
            message, mid, generation = await sub.queue.get()
            await self._handle(sub, message, mid, generation)

    async def _handle(self, sub: _Subscription, message: Message, mid: int, generation: int) -> None:
        try:
            await sub.handler(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mqtt %s: handler for %s failed; message left unacknowledged",
                          self.client_id, message.topic)
            return
        self._ack(mid, message.qos, generation)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if qos == 0 or generation != self._generation or not self.connected:
            return
        self._client.ack(mid, qos)
