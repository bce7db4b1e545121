"""The hub's storage interface (`HubStorage`) and what goes in and out of it.

Two implementations:

* `SqliteStorage` (sync/hub/store.py), the default: one SQLite file (`storage.path`), one
  writer connection on its own thread. The hub process is its only writer, so it keeps
  each store's ack in memory beside the database (moved only after each commit).
* `PgStorage` (sync/hub/pg.py): PostgreSQL (`storage.url = "postgresql://..."`), psycopg 3
  async with a connection pool. Any number of hub workers share one database, so nothing
  is kept in memory as the truth: every ack is read from the database, in the transaction
  that moves it, under the store's row lock.

`sync.hub.engines.open_storage(config)` opens the one the configuration names.

Acks: `AckState(acked_seq, rev, epoch)`. `acked_seq` is the store's contiguous prefix;
`rev` grows by one in every transaction that changes `acked_seq`; `epoch` names the
hub's record (a new one whenever that record may have gone back: each open of a SQLite
database, a restored or another PostgreSQL database, `edge-hub epoch --new`).

Ingest hooks (`storage.ingest_hooks`): `hook(store_id, new_events)` is called inside the
ingest transaction once per store per group, with every event that group stored for the
store in arrival order, as (head, raw body) pairs from `Incoming.events`. It returns what
the storage writes in the same transaction, in a form with no SQL dialect in it:

* `None`: nothing;
* `bytes`: a pending-deltas blob, inserted as one `hub_stock_pending(store_id, deltas)` row
  (the availability projection, `projection.pending_deltas`);
* a list of `Upsert`: rows for a named table, inserted in order, with what to do on a key
  conflict (add into columns, replace columns, or keep the held row) (the cap use,
  `captables.usage_rows`).

A hook that raises rolls the whole group back (nothing of it is stored).

Migrations: sync/hub/migrations.py (each engine's versioned list; modules register theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, TypeVar, Union

from sync.protocol import EventHead


T = TypeVar("T")

REJECTIONS_KEPT = 10_000


@dataclass(frozen=True)
class Incoming:
    """One decoded, validated batch for a known store.

    `hashes`: the batch's chain at each event, computed from its `prev_hash` over the
    bodies and already checked against its `hash` (None: the batch carried no hashes).
    `incarnation`: the store's log incarnation the batch says it comes from (None: an
    older agent); a batch below the one the hub holds is refused `stale_incarnation`.
    """

    store_id: str
    events: list[tuple[EventHead, bytes]]
    prev_hash: bytes | None = None
    hashes: list[bytes] | None = None
    topic: str = ""
    incarnation: int | None = None


@dataclass(frozen=True)
class Rejection:
    """A message refused before storage, to be recorded and counted.

    `restate_ack`: publish the store's current ack after the commit (a refused batch
    of a configured store, so its sender learns where the hub is).
    """

    topic: str
    store_id: str | None
    reason: str
    detail: str
    restate_ack: bool = False


@dataclass
class IngestResult:
    """What one batch did: new events stored, duplicates ignored, conflicts kept out.

    `chain_broken`: why the batch was refused (nothing of it stored), or why the events
    held after a gap that it filled do not count toward the ack; None when its chain held.
    `stale_incarnation`: why the batch was refused whole (it comes from an older
    incarnation of the store's log than the hub holds), recorded as a rejection; the
    sender gets the store's current ack.
    """

    stored: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, held id, sent id)
    new_events: list = field(default_factory=list, repr=False)  # (head, body) of the events stored now
    chain_broken: str | None = None
    unanchored: bool = False
    stale_incarnation: str | None = None   # why the batch was refused (an older incarnation's)


@dataclass(frozen=True)
class AckState:
    """A store's committed ack: its contiguous prefix, its revision, the hub record's epoch."""

    acked_seq: int
    rev: int
    epoch: str


class WriteResults(list):
    """`write`'s answer: one IngestResult (or None for a Rejection) per item, in order.

    `acks`: the committed AckState of every store the group names (its batches and its
    rejections with a store id), read in the committing transaction: publish these.
    """

    def __init__(self, results: Iterable = (), acks: dict[str, AckState] | None = None):
        super().__init__(results)
        self.acks: dict[str, AckState] = acks if acks is not None else {}


@dataclass(frozen=True)
class Upsert:
    """Rows an ingest hook wants written to `table` in the ingest transaction.

    On a conflict on `key`: `add` columns get the new value added to the held one,
    `replace` columns take the new value; with neither, the held row is kept.
    """

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rows: list[tuple]
    add: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()

    def sql(self, placeholder: str) -> str:
        """The statement for one row; `placeholder` is "?" (SQLite) or "%s" (psycopg)."""
        cols = ", ".join(self.columns)
        values = ", ".join([placeholder] * len(self.columns))
        sets = [f"{c} = {self.table}.{c} + excluded.{c}" for c in self.add]
        sets += [f"{c} = excluded.{c}" for c in self.replace]
        action = "DO UPDATE SET " + ", ".join(sets) if sets else "DO NOTHING"
        return f"INSERT INTO {self.table}({cols}) VALUES ({values}) ON CONFLICT({', '.join(self.key)}) {action}"


HookOutput = Union[bytes, list[Upsert], None]
IngestHook = Callable[[str, list], HookOutput]


class HubStorage(Protocol):
    """What the hub needs of its database (see the module docstring)."""

    ingest_hooks: list[IngestHook]
    rejections_kept: int

    async def close(self) -> None: ...

    async def write(self, items: list[Incoming | Rejection], now: str) -> WriteResults:
        """Store a group of batches and rejections in one transaction; one result each.

        Idempotent: a batch stored again only counts duplicates. Raises StorageError
        (nothing stored). `.acks` holds the committed acks of the stores it names.
        """

    async def acked(self, store_id: str) -> int: ...

    async def ack_state(self, store_id: str) -> AckState: ...

    async def ack_states(self, store_ids: Iterable[str]) -> dict[str, AckState]: ...

    async def epoch(self) -> str: ...

    async def events_after(self, store_id: str, after_seq: int, limit: int
                           ) -> list[tuple[int, bytes, bytes | None]]:
        """Up to `limit` (seq, raw body, hub's chain hash or None) after `after_seq`, in seq order."""

    def iter_bodies(self, store_id: str, after_seq: int = 0) -> AsyncIterator[bytes]:
        """Every held body of the store after `after_seq`, in seq order (gaps and all)."""

    async def stats(self) -> dict:
        """Per store counts and every rejection ever, by reason (`edge-hub stats`)."""

    async def store_rows(self) -> list[dict]:
        """Per store: acked_seq, max_seq, rev, incarnation, updated_at (last contact), conflicts."""

    async def run(self, fn: Callable[[Any], T] | Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(conn)` in its own write transaction (SQLite: a sqlite3 connection and a
        plain function; PostgreSQL: a psycopg AsyncConnection and a coroutine function)."""


def result_topic(items: list, store_id: str) -> str:
    """The topic of the store's last batch among `items` (for a rejection found by the walk)."""
    return next((i.topic for i in reversed(items) if isinstance(i, Incoming) and i.store_id == store_id), "")

def stale_detail(first: int, last: int, sent: int, held: int) -> str:
    return (f"seqs {first}..{last} come from incarnation {sent} of the store's log;"
            f" the hub holds incarnation {held}")

def walk_broken_detail(broken_at: int, acked: int) -> str:
    return (f"the event held at seq {broken_at} (after a gap) does not continue the"
            f" chain at seq {broken_at - 1}: the ack stays at {acked}")


async def iter_bodies(storage: HubStorage, store_id: str, after_seq: int = 0,
                      chunk: int = 5000) -> AsyncIterator[bytes]:
    """Yield every held event body of a store in seq order (gaps and all), `chunk` rows a read."""
    while True:
        rows = await storage.events_after(store_id, after_seq, chunk)
        if not rows:
            return
        for _, body, _ in rows:
            yield body
        after_seq = rows[-1][0]
