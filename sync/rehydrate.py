"""The sync process's half of rehydrate: hear where the hub is, fetch what the log lacks.

Every ack of this store is recorded in sync.db (`hub_ack`: its seq and the log's
incarnation it was heard under) before the uplink's rules see it, also when it is
beyond the log's end (which the rules refuse to trust for the cursor). The agent reads
that row: it fences writes while the hub holds more of the store's history than the log,
and after a restore until an ack has been heard at all (agent/rehydrate.py).

While the hub's ack is beyond both the log's end and what is staged, this publishes
`P/stores/{id}/rehydrate` `{"v":1, "store_id", "after_seq", "request_id", "incarnation"}`
and stages the chunks the hub answers on `P/stores/{id}/history` in sync.db (`history`),
durably, before the message is acknowledged. A chunk whose bodies do not reach its own
`hash` from its `prev_hash` is dropped and counted (`history_invalid`); whether the
history continues the log's own chain is the agent's check, when it appends. The
request is sent again when a response is complete but the hub holds more, or after
`REQUEST_TIMEOUT_S` without a chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

from common import chain, clock
from common.aio import wait_for
from sync import protocol
from sync.mqtt import Message, MqttClient
from sync.state import SqliteSyncState

log = logging.getLogger("edge_sync.rehydrate")

REQUEST_TIMEOUT_S = 3.0
POLL_S = 0.25


class Rehydrate:
    """See the module docstring. `attach(uplink)` before the MQTT client starts; `run()` as a task."""

    def __init__(self, store_id: str, prefix: str, feed, state: SqliteSyncState, mqtt: MqttClient, *,
                 monotonic: Callable[[], float] = time.monotonic):
        self.store_id, self.prefix = store_id, prefix
        self.feed, self.state, self.mqtt = feed, state, mqtt
        self._monotonic = monotonic
        self.hub_acked: int | None = None
        self.staged_end = 0
        self._request: tuple[str, int, float] | None = None   # (request_id, after_seq, last progress)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._uplink = None
        self._caught_up_at: int | None = None
        self._stored: tuple[int, int] | None = None   # the hub_ack row as written
        self.counts = {"rehydrate_requests": 0, "history_events_staged": 0, "history_invalid": 0}

    def attach(self, uplink) -> None:
        self._uplink = uplink
        uplink.ack_listeners.append(self.on_ack)
        self.mqtt.subscribe(protocol.history_topic(self.prefix, self.store_id), self.on_history)

    async def open(self) -> None:
        self._stored = await self.state.hub_ack()
        if self._stored is not None:
            self.hub_acked = self._stored[0]
        self.staged_end = await self.state.stage_history([], self.feed.last_seq())

    async def on_ack(self, ack: protocol.Ack) -> None:
        await self._record(ack.acked_seq)

    async def _record(self, acked_seq: int) -> None:
        """Keep the hub's ack; write it to sync.db when the agent's fence depends on it.

        It does while the row is missing, was heard under another incarnation, or says
        more than the log holds (or said so until now): in steady state, with the ack at
        or below the log's end, an ack costs no write of its own beside the cursor's.
        """
        incarnation = self.feed.incarnation()
        last = self.feed.last_seq()
        stored = self._stored
        if (stored is None or stored[1] != incarnation or acked_seq > last
                or (stored[0] > last and stored[0] != acked_seq)):
            await self.state.store_hub_ack(acked_seq, incarnation, clock.utc_now())
            self._stored = (acked_seq, incarnation)
        self.hub_acked = acked_seq
        self._wake.set()

    async def on_history(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            batch = protocol.decode(message.payload, protocol.HistoryBatch)
        except protocol.ProtocolError as exc:
            self.counts["history_invalid"] += 1
            log.warning("sync: ignoring an undecodable history message: %s", exc)
            return
        if batch.store_id != self.store_id:
            self.counts["history_invalid"] += 1
            log.warning("sync: ignoring history for store %s", batch.store_id)
            return
        bodies = [bytes(raw) for raw in batch.events]
        if batch.events and (len(bodies) != batch.last_seq - batch.first_seq + 1 or batch.first_seq < 1):
            self.counts["history_invalid"] += 1
            log.warning("sync: history %d..%d holds %d events; dropped", batch.first_seq, batch.last_seq, len(bodies))
            return
        hashes: list[bytes | None] = [None] * len(bodies)
        if batch.prev_hash is not None and batch.hash is not None and bodies:
            hashes = chain.hashes(bytes.fromhex(batch.prev_hash), bodies)
            if hashes[-1].hex() != batch.hash:
                self.counts["history_invalid"] += 1
                log.error("sync: history %d..%d from the hub does not reach its own hash; dropped",
                          batch.first_seq, batch.last_seq)
                return
        async with self._lock:
            rows = [(batch.first_seq + i, body, h) for i, (body, h) in enumerate(zip(bodies, hashes))]
            self.staged_end = await self.state.stage_history(rows, self.feed.last_seq())
            self.counts["history_events_staged"] += len(rows)
            if batch.hub_acked_seq != self.hub_acked:
                await self._record(batch.hub_acked_seq)
            if self._request is not None:
                rid, after, _ = self._request
                self._request = (rid, after, self._monotonic())
        self._wake.set()

    def behind(self) -> bool:
        """True while the hub acks more than the log and the staged rows hold."""
        return self.hub_acked is not None and self.hub_acked > max(self.feed.last_seq(), self.staged_end)

    async def step(self) -> None:
        async with self._lock:
            last = self.feed.last_seq()
            if self.staged_end < last:
                self.staged_end = await self.state.stage_history([], last)
            if not self.behind():
                self._request = None
                await self._caught_up(last)
                return
            if not self.mqtt.connected:
                return
            have = max(last, self.staged_end)
            now = self._monotonic()
            if self._request is not None:
                rid, after, progress = self._request
                complete = have >= after + protocol.HISTORY_CHUNK_EVENTS * protocol.HISTORY_MAX_CHUNKS
                if not complete and now - progress < REQUEST_TIMEOUT_S:
                    return
            request = protocol.RehydrateRequest(store_id=self.store_id, after_seq=have,
                                                request_id=uuid.uuid4().hex, incarnation=self.feed.incarnation())
            try:
                self.mqtt.publish(protocol.rehydrate_topic(self.prefix, self.store_id),
                                  protocol.encode(request), qos=1).add_done_callback(_quiet)
            except Exception as exc:
                log.warning("sync: could not ask the hub for history: %s", exc)
                return
            self.counts["rehydrate_requests"] += 1
            self._request = (request.request_id, have, now)
            log.info("sync: the hub holds %d events of %s, the log %d (staged %d): asking for the rest",
                     self.hub_acked, self.store_id, last, self.staged_end)

    async def _caught_up(self, last: int) -> None:
        """Once the log holds the hub's events again, hand the hub's ack to the uplink.

        The rules ignored it while it was beyond the log; heard again now, it moves the
        cursor to where the hub is, instead of the log being sent again from the old cursor.
        """
        acked = self.hub_acked
        if (self._uplink is None or acked is None or acked > last or acked <= self._uplink.acked_seq
                or self._caught_up_at == acked):
            return
        self._caught_up_at = acked
        payload = protocol.encode(protocol.Ack(store_id=self.store_id, acked_seq=acked))
        await self._uplink.on_ack(Message(protocol.ack_topic(self.prefix, self.store_id), payload, 1, False))

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.step()
            try:
                await wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass


def _quiet(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sync: rehydrate request publish failed: %s", future.exception())
