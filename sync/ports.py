"""The sync process's roles, as Protocols: what the uplink and downlink need from storage.

`edge-agent sync` reads the agent's log (`LogFeed`, read-only: the agent is its only
writer) and keeps its own progress in its own database (`SyncState`, of which it is the
only writer). Implementations: sync/feed.py (`SqliteLogFeed`) and sync/state.py
(`SqliteSyncState`). tests/sync/test_state.py holds SqliteSyncState to these rules and
tests/sync/test_uplink_shell.py drives the uplink through in-memory implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class LogFeed(Protocol):
    """The store's event log, read-only. Every method is a point read (microseconds)."""

    def last_seq(self) -> int:
        """Return the highest committed seq (0 for an empty log)."""

    def changed(self) -> bool:
        """Return True when the log may have changed since the previous call (cheap: poll it)."""

    def batch(self, after_seq: int, max_events: int, max_bytes: int) -> "Batch | None":
        """Return the next batch after `after_seq` (at least one event, within both caps), or None."""

    def close(self) -> None:
        """Close the read connection."""


@dataclass(frozen=True)
class Batch:
    """Consecutive events `first_seq..last_seq`, their bodies joined by commas as stored.

    `prev_hash`/`last_hash`: the log's chain hashes at first_seq - 1 and last_seq (None from
    a feed that has none).
    """

    first_seq: int
    last_seq: int
    count: int
    bodies: bytes
    prev_hash: bytes | None = None
    last_hash: bytes | None = None


@dataclass(frozen=True)
class UplinkStatus:
    """What the uplink shows the agent (GET /v1/sync) beside the cursor."""

    connected: bool = False
    reconnects: int = 0
    sent_seq: int = 0
    inflight_batches: int = 0
    resends: int = 0
    rewinds: int = 0
    ack_alarms: int = 0
    alarm: str | None = None
    events_sent: int = 0


@dataclass(frozen=True)
class ApplyOutcome:
    """What a snapshot apply did: `applied` False when the version was not newer than the held one."""

    applied: bool
    held_version: int | None
    changed: int = 0
    removed: int = 0


# A snapshot row as stored: (sku, the item's JSON bytes as received, online or None,
# the item's cap as JSON or None); a 3-tuple means no cap.
Row = tuple


class SyncState(Protocol):
    """The sync process's own durable state: cursor, status, snapshot, catalog.

    Every write is one transaction, committed before the call returns; a failure raises
    StorageError (common.errors) and leaves the previous state.
    """

    async def cursor(self) -> tuple[int, str | None]:
        """Return the stored (acked_seq, last_ack_at); (0, None) before the first ack."""

    async def ack_mark(self) -> tuple[str | None, int | None]:
        """Return the stored cursor's (epoch, rev) mark; (None, None) before a marked ack."""

    async def store_cursor(self, acked_seq: int, at: str, status: UplinkStatus | None = None,
                           mark: tuple[str | None, int | None] = (None, None)) -> None:
        """Persist the cursor with its ack's (epoch, rev) mark (and, when given, the status),
        in one transaction."""

    async def store_status(self, status: UplinkStatus) -> None:
        """Persist the uplink's status and this process's heartbeat (now)."""

    async def beat(self) -> None:
        """Persist this process's heartbeat (now): the agent's supervisor reads it to tell a frozen sync."""

    async def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the downlink's counters (`snapshots_applied`, `dropped_<reason>`, ...)."""

    @property
    def snapshot_version(self) -> int | None:
        """The held availability snapshot's version, or None."""

    async def apply_snapshot(self, version: int, generated_at: str, rows: Sequence[Row],
                             digest: bytes, sources: Sequence[tuple] = ()) -> ApplyOutcome:
        """Store a snapshot if `version` is newer than the held one; idempotent by version.

        `sources`: the snapshot's sources table as rows (sync.downlink.table_rows).
        """

    @property
    def catalog_version(self) -> int | None:
        """The held catalog's version, or None."""

    async def apply_catalog(self, version: int, items: Sequence[tuple[str, str]]) -> bool:
        """Replace the catalog with (sku, name) pairs if `version` is newer; return whether it did."""

    async def close(self) -> None:
        """Finish the pending write and close."""
