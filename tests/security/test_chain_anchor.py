"""The hub anchors each store's hash chain: a rewritten history is refused at its next batch.

A real `edge-hub run` and mosquitto; batches built here with the agent's chain rule
(common/chain.py) over the bodies the test makes, so each test controls what the store
claims. The last test runs a real agent and compares the hub's held hash with its log.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3

from common import chain
from sync import protocol
from tests.sync.agents import post_events, sync_agent, wait_synced
from tests.sync.helpers import PREFIX, STORE, AckWatcher, body, eventually, mqtt_client
from tests.sync.hubproc import HubProcess

OTHER = "store-0043"


class StoreLog:
    """A store's log as the agent keeps it: bodies by seq and the chain hash at each."""

    def __init__(self, store_id: str = STORE, n: int = 0):
        self.store_id = store_id
        self.bodies: dict[int, bytes] = {}
        self.append(n)

    def append(self, n: int, qty: int = 1) -> None:
        for seq in range(len(self.bodies) + 1, len(self.bodies) + n + 1):
            self.bodies[seq] = _body(seq, self.store_id, qty)

    def rewrite(self, first: int, last: int, qty: int) -> None:
        """Change seqs first..last (same seqs and event ids, other quantities): the chain is recomputed."""
        for seq in range(first, last + 1):
            self.bodies[seq] = _body(seq, self.store_id, qty)

    def hash_at(self, seq: int) -> bytes:
        return chain.hashes(chain.GENESIS, [self.bodies[s] for s in range(1, seq + 1)])[-1] if seq else chain.GENESIS

    def batch(self, first: int, last: int) -> bytes:
        return protocol.encode_batch(self.store_id, first, last, [self.bodies[s] for s in range(first, last + 1)],
                                     self.hash_at(first - 1), self.hash_at(last))

    def unanchored(self, first: int, last: int) -> bytes:
        return protocol.encode_batch(self.store_id, first, last, [self.bodies[s] for s in range(first, last + 1)])


def _body(seq: int, store_id: str, qty: int) -> bytes:
    return body(seq, store_id).replace(b'"qty":1', b'"qty":%d' % qty)


async def _publish(client, store_id: str, payload: bytes) -> None:
    await asyncio.wait_for(client.publish(protocol.events_topic(PREFIX, store_id), payload), 10)


async def _sender(broker):
    client = mqtt_client(broker, "test-sender")
    await client.start()
    await client.wait_subscribed(10)
    return client


def _store_stats(hub, store_id: str = STORE) -> dict:
    return hub.stats()["stores"][store_id]


async def test_a_rewritten_history_is_refused_at_its_next_batch_and_other_stores_go_on(tmp_path, broker):
    log, other = StoreLog(n=5), StoreLog(OTHER, n=4)
    sender = await _sender(broker)
    try:
        with HubProcess(tmp_path / "hub", broker, stores=(STORE, OTHER)) as hub:
            async with AckWatcher(broker) as acks, AckWatcher(broker, OTHER, "test-ack-other") as other_acks:
                await _publish(sender, STORE, log.batch(1, 5))
                await eventually(lambda: acks.last == 5, what="ack 5")
                held = log.hash_at(5)
                assert _store_stats(hub)["chain_hash"] == held.hex()

                log.rewrite(3, 5, qty=40)  # the store's history changes, its chain recomputed
                log.append(3)
                assert log.hash_at(5) != held
                before = len(acks.seen)
                await _publish(sender, STORE, log.batch(6, 8))
                await eventually(lambda: hub.stats()["rejected"].get("chain_broken") == 1, what="chain_broken 1")
                await eventually(lambda: len(acks.seen) > before, what="the restated ack")
                assert set(acks.seen[before:]) == {5}, "the valid prefix stays acked, nothing past it"
                await _publish(sender, STORE, log.batch(3, 8))  # the rewritten seqs themselves, resent
                await eventually(lambda: hub.stats()["rejected"].get("chain_broken") == 2, what="chain_broken 2")

                await _publish(sender, OTHER, other.batch(1, 4))
                await eventually(lambda: other_acks.last == 4, what="the other store's ack")
                assert acks.last == 5
            stats = hub.stats()
            assert stats["stores"][STORE] | {"chain_hash": held.hex(), "acked_seq": 5, "events": 5,
                                             "chain_breaks": 2} == stats["stores"][STORE]
            assert stats["stores"][OTHER]["chain_breaks"] == 0
            assert stats["stores"][OTHER]["chain_hash"] == other.hash_at(4).hex()
            assert [e["qty"] for e in hub.export()] == [1, 1, 1, 1, 1], "nothing of the rewrite merged"
            assert "ALARM store-0042: its hash chain does not continue" in hub.output()
            with sqlite3.connect(hub.db_path) as conn:
                reasons = conn.execute("SELECT reason, store_id FROM rejections").fetchall()
            assert reasons == [("chain_broken", STORE)] * 2
    finally:
        await sender.stop()


async def test_a_tampered_body_under_the_original_hash_is_refused(tmp_path, broker):
    log = StoreLog(n=3)
    honest = log.batch(1, 3)
    tampered = honest.replace(log.bodies[2], log.bodies[2].replace(b'"qty":1', b'"qty":9'))
    assert tampered != honest
    sender = await _sender(broker)
    try:
        with HubProcess(tmp_path / "hub", broker) as hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, tampered)
                await eventually(lambda: hub.stats()["rejected"].get("chain_invalid") == 1, what="chain_invalid")
                assert hub.export() == []
                await _publish(sender, STORE, honest)
                await eventually(lambda: acks.last == 3, what="the honest batch acked")
            assert [e["qty"] for e in hub.export()] == [1, 1, 1]
            assert _store_stats(hub)["chain_hash"] == log.hash_at(3).hex()
    finally:
        await sender.stop()


async def test_redelivery_is_a_harmless_duplicate(tmp_path, broker):
    log = StoreLog(n=7)
    sender = await _sender(broker)
    try:
        with HubProcess(tmp_path / "hub", broker) as hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.batch(1, 5))
                await eventually(lambda: acks.last == 5, what="ack 5")
                for first, last in ((1, 5), (2, 4), (5, 5), (1, 7)):
                    await _publish(sender, STORE, log.batch(first, last))
                await eventually(lambda: acks.last == 7, what="ack 7")
            stats = hub.stats()
            assert stats["rejected"] == {}
            assert stats["stores"][STORE]["chain_hash"] == log.hash_at(7).hex()
            assert [e["seq"] for e in hub.export()] == list(range(1, 8))
    finally:
        await sender.stop()


async def test_after_a_gap_the_chain_is_checked_when_it_fills(tmp_path, broker):
    log = StoreLog(n=9)
    forged = StoreLog(n=9)
    forged.rewrite(7, 9, qty=5)   # a chain of its own from seq 7 on: it does not continue 1..6
    forged_tail = protocol.encode_batch(STORE, 7, 9, [forged.bodies[s] for s in (7, 8, 9)],
                                        bytes(range(32)), chain.hashes(bytes(range(32)),
                                                                       [forged.bodies[s] for s in (7, 8, 9)])[-1])
    sender = await _sender(broker)
    try:
        with HubProcess(tmp_path / "hub", broker) as hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.batch(1, 3))
                await eventually(lambda: acks.last == 3, what="ack 3")
                await _publish(sender, STORE, log.batch(7, 9))      # after a gap: held, not acked
                await eventually(lambda: _store_stats(hub)["max_seq"] == 9, what="seqs 7..9 held")
                assert acks.last == 3
                await _publish(sender, STORE, log.batch(4, 6))      # fills it: 7..9 continue the chain
                await eventually(lambda: acks.last == 9, what="ack 9 once the gap filled")
                assert _store_stats(hub)["chain_hash"] == log.hash_at(9).hex()
        assert hub.stats()["rejected"] == {}

        with HubProcess(tmp_path / "hub2", broker) as hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.batch(1, 3))
                await _publish(sender, STORE, forged_tail)          # self-consistent, held after the gap
                await eventually(lambda: _store_stats(hub)["max_seq"] == 9, what="the forged tail held")
                await _publish(sender, STORE, log.batch(4, 6))
                await eventually(lambda: hub.stats()["rejected"].get("chain_broken") == 1, what="chain_broken")
                await eventually(lambda: acks.last == 6, what="ack 6")
                assert _store_stats(hub)["acked_seq"] == 6, "the forged events are never acked"
                assert _store_stats(hub)["chain_hash"] == log.hash_at(6).hex()
    finally:
        await sender.stop()


async def test_an_old_agent_without_hashes_is_accepted_and_counted_unanchored(tmp_path, broker):
    log = StoreLog(n=6)
    sender = await _sender(broker)
    try:
        with HubProcess(tmp_path / "hub", broker) as hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.unanchored(1, 4))
                await eventually(lambda: acks.last == 4, what="ack 4")
                stats = _store_stats(hub)
                assert stats["unanchored_batches"] == 1
                # The hub chains the bodies it holds itself: an upgraded agent continues from there.
                assert stats["chain_hash"] == log.hash_at(4).hex()
                wrong = protocol.encode_batch(STORE, 5, 6, [log.bodies[5], log.bodies[6]], bytes(32),
                                              chain.hashes(bytes(32), [log.bodies[5], log.bodies[6]])[-1])
                await _publish(sender, STORE, wrong)
                await eventually(lambda: hub.stats()["rejected"].get("chain_broken") == 1, what="chain_broken")
                await _publish(sender, STORE, log.batch(5, 6))
                await eventually(lambda: acks.last == 6, what="ack 6")
            stats = _store_stats(hub)
            assert (stats["unanchored_batches"], stats["chain_hash"]) == (1, log.hash_at(6).hex())
    finally:
        await sender.stop()


async def test_a_hub_restored_to_an_older_copy_takes_the_resent_events_and_its_chain_still_checks(tmp_path, broker):
    log = StoreLog(n=8)
    sender = await _sender(broker)
    hub = HubProcess(tmp_path / "hub", broker)
    try:
        with hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.batch(1, 3))
                await eventually(lambda: acks.last == 3, what="ack 3")
            assert hub.terminate() == 0
        backup = tmp_path / "backup.db"
        shutil.copy(hub.db_path, backup)
        with hub:
            async with AckWatcher(broker) as acks:
                await _publish(sender, STORE, log.batch(4, 8))
                await eventually(lambda: acks.last == 8, what="ack 8")
            assert hub.terminate() == 0
        for suffix in ("-wal", "-shm"):
            (hub.db_path.parent / (hub.db_path.name + suffix)).unlink(missing_ok=True)
        shutil.copy(backup, hub.db_path)
        with hub:
            async with AckWatcher(broker) as acks:
                await eventually(lambda: acks.last == 3, what="the restored hub's ack 3 (the agent rewinds)")
                await _publish(sender, STORE, log.batch(4, 8))
                await eventually(lambda: acks.last == 8, what="ack 8 again")
            assert hub.stats()["rejected"] == {}
            assert _store_stats(hub)["chain_hash"] == log.hash_at(8).hex()
    finally:
        await sender.stop()


async def test_end_to_end_the_hub_holds_the_agents_hash_at_its_last_seq(tmp_path, broker):
    with HubProcess(tmp_path / "hub", broker) as hub, sync_agent(tmp_path, broker) as agent:
        post_events(agent, 450)
        post_events(agent, 77)
        status = wait_synced(agent)
        assert status["last_seq"] == 527
        with sqlite3.connect(f"file:{agent.db_path}?mode=ro", uri=True) as conn:
            agent_hash = conn.execute("SELECT hash FROM events WHERE seq = 527").fetchone()[0]
        stats = _store_stats(hub)
        assert (stats["acked_seq"], stats["chain_hash"]) == (527, agent_hash.hex())
        assert stats["unanchored_batches"] == 0 and hub.stats()["rejected"] == {}
        assert agent.terminate() == 0
