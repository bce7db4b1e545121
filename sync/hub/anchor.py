"""The hub's anchor of each store's hash chain (common/chain.py; docs/protocol.md, Hash chain).

The hub keeps, beside each event it holds, the chain hash at that event, which it computes
itself over the body it stores (the bytes the agent hashed). A batch that carries hashes
(`prev_hash`, `hash`) must agree with what the hub holds: its chain at the last seq both
it and the hub hold (the hub's contiguous prefix, or the batch's end when that comes
first) must equal the hub's hash there. By sha256's collision resistance, agreeing at one
seq means the store's history up to that seq is the one the hub holds, byte for byte; a
store whose history was rewritten, even with the chain recomputed, disagrees at its next
batch. Events held after a gap are checked when the gap fills (`walk`): the ack moves
only over events whose stored hash continues the chain.

Functions run on the hub's writer connection inside the ingest transaction; `check_at`,
`disagreement` and `advance` are pure (PostgreSQL's ingest, sync/hub/pg.py, uses them too).
"""

from __future__ import annotations

import sqlite3

from common import chain

MIGRATIONS = (
    ("events", "hash", "ALTER TABLE events ADD COLUMN hash BLOB"),
    ("stores", "unanchored", "ALTER TABLE stores ADD COLUMN unanchored INTEGER NOT NULL DEFAULT 0"),
    ("stores", "chain_breaks", "ALTER TABLE stores ADD COLUMN chain_breaks INTEGER NOT NULL DEFAULT 0"),
)

_WALK_CHUNK = 2000


def migrate(conn: sqlite3.Connection) -> None:
    """Add the chain columns to a database created before them (NULL hashes: not known)."""
    for table, column, sql in MIGRATIONS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(sql)


def hash_at(conn: sqlite3.Connection, store_id: str, seq: int) -> bytes | None:
    """Return the hub's chain hash at `seq` (GENESIS at 0; None when not held or not known)."""
    if seq == 0:
        return chain.GENESIS
    row = conn.execute("SELECT hash FROM events WHERE store_id = ? AND seq = ?", (store_id, seq)).fetchone()
    return row[0] if row else None


def check_at(first: int, count: int, acked: int) -> int | None:
    """The seq at which a batch of `count` events from `first` is compared with the hub's
    chain (the last one both hold), or None when it starts after a gap (checked by the walk)."""
    at = min(first + count - 1, acked)
    return None if at < first - 1 else at


def disagreement(first: int, prev_hash: bytes, hashes: list[bytes], at: int, theirs: bytes | None) -> str | None:
    """None when the batch's chain at `at` is the hub's (`theirs`; None: not known), else what differs."""
    mine = prev_hash if at == first - 1 else hashes[at - first]
    if theirs is None or bytes(theirs) == mine:
        return None
    last = first + len(hashes) - 1
    return (f"seqs {first}..{last}: the chain at seq {at} is {mine.hex()[:16]}..., the hub holds"
            f" {bytes(theirs).hex()[:16]}... (the store's history differs from what the hub acked)")


def check(conn: sqlite3.Connection, store_id: str, first: int, prev_hash: bytes, hashes: list[bytes],
          acked: int, held: bytes | None) -> str | None:
    """Check a self-consistent batch (hashes[i]: its chain at first + i) against the hub.

    `acked`/`held`: the store's contiguous prefix and the hub's hash there (None: not
    known, an unanchored history). Return None when the batch continues what the hub holds
    (or cannot be checked yet: it starts after a gap, or the hub's hash there is not known),
    else what disagrees.
    """
    at = check_at(first, len(hashes), acked)
    if at is None:
        return None  # after a gap: checked when the gap fills (walk)
    theirs = held if at == acked else hash_at(conn, store_id, at)
    return disagreement(first, prev_hash, hashes, at, theirs)


def advance(rows, acked: int, held: bytes | None) -> tuple[int, bytes | None, int | None, list, bool]:
    """Walk held (seq, body, stored hash) rows in seq order from the prefix `acked`/`held`.

    Return (acked, hash there, seq whose chain breaks or None, [(seq, hash)] to fill in for
    rows held without one, whether a gap or break stopped the walk). Pure: both engines use it.
    """
    link = chain.link
    fills = []
    for seq, body, stored in rows:
        if seq != acked + 1:
            return acked, held, None, fills, True
        expect = link(held, body) if held is not None else None
        if stored is None:
            if expect is not None:
                fills.append((seq, expect))
        elif expect is not None and bytes(stored) != expect:
            return acked, held, seq, fills, True
        acked, held = seq, (expect if expect is not None else (bytes(stored) if stored is not None else None))
    return acked, held, None, fills, False


def walk(conn: sqlite3.Connection, store_id: str, acked: int, held: bytes | None
         ) -> tuple[int, bytes | None, int | None]:
    """Extend the contiguous prefix over held events, checking their chain.

    Return (acked, hash there, None), or (acked, hash there, seq) when the event at `seq`
    continues the prefix by seq but not by chain: the ack stops before it. An event held
    without a hash (an unanchored batch after a gap) gets the one the hub computes.
    """
    while True:
        rows = conn.execute("SELECT seq, body, hash FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                            (store_id, acked, _WALK_CHUNK)).fetchall()
        acked, held, broken_at, fills, stopped = advance(rows, acked, held)
        if fills:
            conn.executemany("UPDATE events SET hash = ? WHERE store_id = ? AND seq = ?",
                             [(h, store_id, seq) for seq, h in fills])
        if stopped or len(rows) < _WALK_CHUNK:
            return acked, held, broken_at
