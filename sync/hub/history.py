"""The hub's answer to a store that asks for its own history back (rehydrate).

A store whose log holds less of its history than the hub (restored from an older
backup, or a new box for the same store) publishes `P/stores/{id}/rehydrate`
`{"v":1, "store_id", "after_seq", "request_id"}`. The hub answers on
`P/stores/{id}/history` with the events it holds after `after_seq`, up to its ack (the
prefix it holds gapless and chain-checked), in chunks of `CHUNK_EVENTS`, at most
`MAX_CHUNKS` per request: each chunk an EventBatch with the bodies exactly as it holds
them, `prev_hash`/`hash` as the hub holds them (both left out when the hub does not know
one of them: an unanchored history), the `request_id` and `hub_acked_seq`. The agent
checks the chain against its own log and asks again after the last event it staged.

A request that does not decode, names another store than its topic, or a store not in
`[[stores]]` is logged (rate-limited, as refused batches are), counted and dropped.
Reads go through `events_after(store_id, after_seq, limit)` of the hub's storage when it
has one, else through the hub's read-only connection.
"""

from __future__ import annotations

import logging

import msgspec

from common import chain
from sync import protocol
from sync.mqtt import Message

log = logging.getLogger("edge_hub.history")

CHUNK_EVENTS = protocol.HISTORY_CHUNK_EVENTS
MAX_CHUNKS = protocol.HISTORY_MAX_CHUNKS


class HistoryServer:
    """Answers rehydrate requests for `service` (a sync.hub.service.HubService)."""

    def __init__(self, service):
        self.service = service
        self.prefix = service.prefix

    @classmethod
    def attach(cls, service) -> "HistoryServer":
        server = cls(service)
        service.mqtt.subscribe(protocol.all_rehydrate_filter(server.prefix), server.on_request, qos=1)
        return server

    def _refuse(self, topic: str, store_id: str | None, reason: str, detail: str) -> None:
        self.service.counters[f"rehydrate_refused_{reason}"] += 1
        self.service.refusals.refused(store_id, reason, topic, detail)

    async def on_request(self, message: Message) -> None:
        topic_store = protocol.store_of(self.prefix, message.topic, "rehydrate")
        if topic_store not in self.service.store_ids:
            self._refuse(message.topic, topic_store, "unknown_store", f"store {topic_store!r} is not in [[stores]]")
            return
        try:
            request = protocol.decode(message.payload, protocol.RehydrateRequest)
        except protocol.ProtocolError as exc:
            self._refuse(message.topic, topic_store, "undecodable", str(exc))
            return
        if request.store_id != topic_store:
            self._refuse(message.topic, topic_store, "store_mismatch",
                         f"topic is for {topic_store!r}, payload for {request.store_id!r}")
            return
        self.service.counters["rehydrate_requests"] += 1
        await self.answer(request)

    async def answer(self, request: protocol.RehydrateRequest) -> int:
        """Publish the history after the request's `after_seq` up to the ack; return events sent."""
        store_id = request.store_id
        acked = await self.service.store.acked(store_id)
        after, sent = request.after_seq, 0
        topic = protocol.history_topic(self.prefix, store_id)
        prev = await self._hash_at(store_id, after) if after < acked else None
        for _ in range(MAX_CHUNKS):
            if after >= acked:
                break
            rows = [r for r in await self._events_after(store_id, after, min(CHUNK_EVENTS, acked - after))
                    if r[0] <= acked]
            if not rows or rows[0][0] != after + 1:
                break   # not held gapless (cannot be under the ack): send nothing more
            hashes = [r[2] for r in rows]
            anchored = prev is not None and all(h is not None for h in hashes)
            batch = protocol.HistoryBatch(
                v=1, store_id=store_id, first_seq=rows[0][0], last_seq=rows[-1][0],
                events=[msgspec.Raw(bytes(r[1])) for r in rows], request_id=request.request_id,
                hub_acked_seq=acked, prev_hash=bytes(prev).hex() if anchored else None,
                hash=bytes(hashes[-1]).hex() if anchored else None)
            self.service.mqtt.publish(topic, protocol.encode(batch), qos=1).add_done_callback(_quiet)
            sent += len(rows)
            after, prev = rows[-1][0], hashes[-1]
        if sent == 0:
            # Nothing to send (the store holds all the hub does): say where the hub is.
            empty = protocol.HistoryBatch(v=1, store_id=store_id, first_seq=0, last_seq=0, events=[],
                                          request_id=request.request_id, hub_acked_seq=acked)
            self.service.mqtt.publish(topic, protocol.encode(empty), qos=1).add_done_callback(_quiet)
        self.service.counters["rehydrate_events_sent"] += sent
        log.info("hub: rehydrate %s: sent %d events after %d (ack %d)", store_id, sent, request.after_seq, acked)
        return sent

    async def _events_after(self, store_id: str, after: int, limit: int) -> list[tuple[int, bytes, bytes | None]]:
        return list(await self.service.store.events_after(store_id, after, limit))

    async def _hash_at(self, store_id: str, seq: int) -> bytes | None:
        """The hub's chain hash at `seq` (GENESIS at 0; None when it does not know it)."""
        if seq == 0:
            return chain.GENESIS
        rows = await self._events_after(store_id, seq - 1, 1)
        return rows[0][2] if rows and rows[0][0] == seq else None


def _quiet(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("hub: history publish failed: %s", future.exception())
