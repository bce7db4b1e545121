"""Store incarnation on the wire and in the SQLite hub; the rehydrate messages.

The batch's optional `incarnation` keeps the agent's encoding canonical (no second
look for duplicate keys), old decoders ignore it, and the hub refuses a batch from a
lower incarnation than it holds for the store, whole, while one without the field (an
older agent) is taken as before.
"""

from __future__ import annotations

import msgspec
import pytest

from agent import events as ev
from common import chain
from sync import protocol
from sync.hub.service import HubService
from sync.hub.store import HubStore
from tests.sync.helpers import STORE, body

NOW = "2026-11-27T10:00:00.000Z"


def payload(first: int, last: int, incarnation: int | None, prev: bytes = chain.GENESIS) -> bytes:
    bodies = [body(s) for s in range(first, last + 1)]
    return protocol.encode_batch(STORE, first, last, bodies, prev, chain.hashes(prev, bodies)[-1], incarnation)


def agent_body(seq: int) -> bytes:
    """An event as the agent encodes it (its canonical JSON)."""
    return ev.encode(ev.Received(seq=seq, event_id=f"e{seq}", store_id=STORE, occurred_at=NOW, recorded_at=NOW,
                                 command_id="c", sku="A1", qty=1, location="backroom"))


def test_an_incarnation_keeps_the_agents_encoding_canonical_and_old_decoders_ignore_it():
    bodies = [agent_body(s) for s in (1, 2, 3)]
    data = protocol.encode_batch(STORE, 1, 3, bodies, chain.GENESIS, chain.hashes(chain.GENESIS, bodies)[-1], 7)
    batch, events = protocol.decode_batch(data)
    assert batch.incarnation == 7 and [h.seq for h, _ in events] == [1, 2, 3]
    assert protocol._canonical(data, batch)

    class OldBatch(msgspec.Struct):   # a hub from before the field
        v: int
        store_id: str
        first_seq: int
        last_seq: int
        events: list[msgspec.Raw]

    assert msgspec.json.decode(data, type=OldBatch).last_seq == 3
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_batch(data.replace(b'"incarnation":7', b'"incarnation":0'))


def test_rehydrate_messages_round_trip():
    request = protocol.RehydrateRequest(store_id=STORE, after_seq=5, request_id="r-1", incarnation=2)
    assert protocol.decode(protocol.encode(request), protocol.RehydrateRequest) == request
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b'{"v":1,"store_id":"store-0042","after_seq":-1,"request_id":"r"}', protocol.RehydrateRequest)
    history = protocol.HistoryBatch(v=1, store_id=STORE, first_seq=6, last_seq=6, events=[msgspec.Raw(body(6))],
                                    request_id="r-1", hub_acked_seq=8)
    decoded = protocol.decode(protocol.encode(history), protocol.HistoryBatch)
    assert bytes(decoded.events[0]) == body(6) and decoded.hub_acked_seq == 8 and decoded.prev_hash is None


async def test_the_hub_refuses_a_lower_incarnation_whole_and_records_a_higher_one(tmp_path):
    store = await HubStore.open(tmp_path / "hub.db", [STORE])
    try:
        def incoming(data: bytes):
            batch, events = protocol.decode_batch(data)
            return HubService._anchored("t", STORE, batch, events)

        first = payload(1, 3, 1)
        [result] = await store.write([incoming(first)], NOW)
        assert result.stored == 3 and await store.acked(STORE) == 3
        h3 = chain.hashes(chain.GENESIS, [body(s) for s in (1, 2, 3)])[-1]
        [result] = await store.write([incoming(payload(4, 4, 2, h3))], NOW)    # a new box took over
        assert result.stored == 1 and await store.acked(STORE) == 4
        h4 = chain.link(h3, body(4))
        [stale] = await store.write([incoming(payload(5, 6, 1, h4))], NOW)      # the old box again
        assert stale.stale_incarnation is not None and stale.stored == 0 and await store.acked(STORE) == 4
        assert "incarnation 1" in stale.stale_incarnation and "holds incarnation 2" in stale.stale_incarnation
        [older_agent] = await store.write([incoming(payload(5, 5, None, h4))], NOW)  # no field: as before
        assert older_agent.stored == 1 and await store.acked(STORE) == 5
    finally:
        await store.close()
    import sqlite3
    conn = sqlite3.connect(tmp_path / "hub.db")
    assert conn.execute("SELECT incarnation FROM stores WHERE store_id = ?", (STORE,)).fetchone() == (2,)
    assert conn.execute("SELECT count FROM rejection_counts WHERE reason = 'stale_incarnation'").fetchone() == (1,)
    assert conn.execute("SELECT MAX(seq) FROM events").fetchone() == (5,)
