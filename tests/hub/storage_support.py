"""Batches and engine-neutral SQL for the hub storage contract suite (tests/hub/test_storage_contract.py)."""

from __future__ import annotations

import sqlite3

from common import chain
from sync import protocol
from sync.hub.storage import Incoming
from sync.hub.store import SqliteStorage
from tests.sync.helpers import body

A, B = "store-a", "store-b"
NOW = "2026-11-27T10:00:00.000Z"


def bodies(first: int, last: int, store_id: str = A, event_id: str | None = None) -> list[bytes]:
    return [body(s, store_id, event_id=None if event_id is None else f"{event_id}-{s}") for s in range(first, last + 1)]


def true_hash(store_id: str, seq: int) -> bytes:
    """The chain hash at `seq` of the store's one true history (bodies(1, seq))."""
    return chain.hashes(chain.GENESIS, bodies(1, seq, store_id))[-1] if seq else chain.GENESIS


def incoming(first: int, last: int, store_id: str = A, anchored: bool = True, incarnation: int | None = None,
             event_id: str | None = None, prev: bytes | None = None) -> Incoming:
    """A decoded batch of first..last; anchored: with its chain from the true hash at first-1 (or `prev`)."""
    raw = bodies(first, last, store_id, event_id)
    _, events = protocol.decode_batch(protocol.encode_batch(store_id, first, last, raw))
    topic = f"retail/P/stores/{store_id}/events"
    if not anchored:
        return Incoming(store_id, events, topic=topic, incarnation=incarnation)
    prev = true_hash(store_id, first - 1) if prev is None else prev
    return Incoming(store_id, events, prev, chain.hashes(prev, raw), topic, incarnation)


async def sql(storage, statement: str) -> list[tuple]:
    """Run one statement on the storage's database from a connection of its own; return its rows."""
    if isinstance(storage, SqliteStorage):
        conn = sqlite3.connect(storage.path, isolation_level=None)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()
    import psycopg

    async with await psycopg.AsyncConnection.connect(storage.url, autocommit=True) as conn:
        cur = await conn.execute(statement)
        return await cur.fetchall() if cur.description else []
