"""Read-only queries on the hub's database (export, stats, other hub jobs), on their own connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

from common import chain
from common.errors import storage_error
from common.sqlite import open_readonly


class HubReader:
    """Read-only queries on the hub's database (export, stats, other hub jobs)."""

    def __init__(self, path: str | Path):
        self.conn = open_readonly(path, f"no hub database at {path} (run `edge-hub run` first)")

    def close(self) -> None:
        self.conn.close()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read hub database", exc) from exc

    def events_after(self, store_id: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Return up to `limit` (seq, raw body) of a store after `after_seq`, in seq order."""
        return self._all("SELECT seq, body FROM events WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (store_id, after_seq, limit))

    def iter_bodies(self, store_id: str, after_seq: int = 0, chunk: int = 5000) -> Iterator[bytes]:
        """Yield every held event body of a store in seq order (gaps and all)."""
        while True:
            rows = self.events_after(store_id, after_seq, chunk)
            if not rows:
                return
            for _, body in rows:
                yield body
            after_seq = rows[-1][0]

    def stats(self) -> dict:
        """Return per-store counts and every rejection ever, by reason (see `stats_of`)."""
        try:
            return stats_of(self.conn)
        except sqlite3.Error as exc:
            raise storage_error("read hub database", exc) from exc


def stats_of(conn: sqlite3.Connection) -> dict:
    """Return per-store counts and every rejection ever, by reason.

    Per store: events held, max_seq, acked_seq, conflicts, chain_hash (the hub's chain
    hash at acked_seq, hex; null when not known), unanchored_batches, chain_breaks.
    """
    stores: dict[str, dict] = {}
    for store_id, held, max_seq in conn.execute("SELECT store_id, COUNT(*), MAX(seq) FROM events GROUP BY store_id"):
        stores[store_id] = {"events": held, "max_seq": max_seq, "acked_seq": 0, "conflicts": 0}
    for store_id, acked, unanchored, breaks, held in conn.execute(
            "SELECT s.store_id, s.acked_seq, s.unanchored, s.chain_breaks, e.hash FROM stores s"
            " LEFT JOIN events e ON e.store_id = s.store_id AND e.seq = s.acked_seq"):
        row = stores.setdefault(store_id, {"events": 0, "max_seq": 0, "conflicts": 0})
        held = chain.GENESIS if acked == 0 else held
        row.update(acked_seq=acked, chain_hash=bytes(held).hex() if held is not None else None,
                   unanchored_batches=unanchored, chain_breaks=breaks)
    for store_id, n in conn.execute("SELECT store_id, COUNT(*) FROM conflicts GROUP BY store_id"):
        stores.setdefault(store_id, {"events": 0, "max_seq": 0, "acked_seq": 0})["conflicts"] = n
    rejected = dict(conn.execute("SELECT reason, count FROM rejection_counts"))
    return {"stores": stores, "rejected": rejected}
