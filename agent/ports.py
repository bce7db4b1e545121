"""The agent's roles, as Protocols: what the API, the kiosk and the scheduled jobs need.

`edge-agent run` owns the log (`EventLog`, the only writer of events.db; its reads are
`LogQueries`) and reads what the sync process writes (`SyncView`, read-only on sync.db).
Implementations: agent/log.py (`SqliteEventLog`), agent/reader.py (`LogReader`) and
agent/syncview.py (`SqliteSyncView`). tests/integration/test_ports.py runs one contract
suite for `EventLog` and one for `LogQueries` against each of their implementations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from typing import Iterable

    from agent import events as ev
    from agent.caps import Cap
    from agent.logstore import AppendResult


class LogQueries(Protocol):
    """Point reads of the log and its projections (microseconds: run them on the event loop)."""

    def last_seq(self) -> int:
        """Return the highest committed seq (0 for an empty log)."""

    def stock(self, sku: str) -> dict | None:
        """Return {sku, floor, backroom, reserved, available, last_seq}, or None for a SKU never seen."""

    def stock_as_of(self, sku: str, seq: int) -> dict | None:
        """Return the SKU's stock after events 1..seq, or None when no event touched it by then."""

    def all_stock(self, after_sku: str = "", limit: int = 1_000_000) -> list[dict]:
        """Return stock rows in SKU order after `after_sku`."""

    def events_after(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Return up to `limit` (seq, body) pairs after `after_seq`, bodies at the current schema."""

    def seq_at(self, at: str) -> int:
        """Return the seq before the first event recorded after `at` (the log as it stood at `at`)."""

    def expired_leases(self, now: str, limit: int = 500) -> list[tuple[str, str]]:
        """Return up to `limit` (reservation_id, expires_at) of open leases ended by `now`, oldest first."""

    def cap_used(self, sku: str, first_slot: int, end_slot: int) -> int:
        """Return the SKU's cap usage (sold + reserved - released) in the 15-minute slots [first, end)."""


class EventLog(Protocol):
    """The store's append-only log and its projections; the only writer of its database."""

    path: Path  # the database file (backups and the WAL job look at its size)
    last_seq: int  # the highest seq answered to a caller
    reader: LogQueries

    async def append(self, command: "ev.AppendCommand") -> "AppendResult":
        """Append a command's events, all or none; idempotent by command_id.

        A retry with the same body answers duplicate=True with the original seqs and appends
        nothing. Raises Refused (nothing appended) when the store's rules refuse it or the
        command_id was used with another body (`command_conflict`); StorageError when the
        log cannot commit or is closing.
        """

    def add_listener(self, fn: Callable[[list], None]) -> None:
        """Call `fn(events)` on the event loop after every commit that appended events."""

    async def checkpoint_projection(self) -> int:
        """Take a projection checkpoint at the last seq; return its seq."""

    async def wal_checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Checkpoint the WAL from the writer; return SQLite's (busy, log, checkpointed)."""

    async def backup_to(self, target: str | os.PathLike) -> int:
        """Copy the database to `target` online; return the last seq the copy holds."""

    async def close(self) -> None:
        """Finish queued writes, stop the writer, release the lock; later appends raise StorageError."""


class SyncView(Protocol):
    """What the sync process last recorded, read-only: cursor, status, snapshot, catalog.

    Every method answers at once from the last commit of sync.db; before the sync process
    has ever run (no file yet) it answers as if nothing were held.
    """

    def status(self) -> dict:
        """Return the cursor and the uplink's status: acked_seq, last_ack_at, connected, ...

        Keys: acked_seq, last_ack_at, connected, sent_seq, inflight_batches, reconnects,
        resends, rewinds, ack_alarms, alarm, events_sent, beat_age_s (None: never ran),
        counters (dict of the downlink's counts).
        """

    def snapshot_meta(self) -> dict | None:
        """Return {version, generated_at, age_s, stale} of the held snapshot, or None."""

    def answer(self, sku: str) -> tuple[list[dict], int | None, dict | None]:
        """Return (nearby, online, snapshot meta) for a SKU, all from one committed snapshot."""

    def item(self, sku: str) -> dict:
        """Return {nearby, online, sources, cap (an inventory.Cap or None), snapshot}, from one snapshot."""

    def caps(self, skus: "Iterable[str]") -> "dict[str, Cap]":
        """Return the caps the held snapshot sets for those SKUs (absent: none). Raises StorageError.

        The log's writer reads these at decide time through agent.syncview.HeldCaps, which
        never raises: a missing or unreadable sync.db means the caps last read apply.
        """

    def name(self, sku: str) -> str | None:
        """Return the catalog's product name for a SKU, or None."""

    def search(self, text: str, limit: int = 20) -> list[dict]:
        """Return up to `limit` {sku, name} whose name or SKU contains `text` (case-insensitive)."""

    def close(self) -> None:
        """Close the read connection."""
