"""The hub's storage on PostgreSQL (`HubStorage`, sync/hub/storage.py): psycopg 3 async, a pool.

Any number of hub workers share one database; none keeps anything in memory as the
truth. One ingest transaction per group of batches (READ COMMITTED):

1. the group's stores get a row if they have none (`INSERT ... ON CONFLICT DO NOTHING`,
   sorted), then their rows are locked `SELECT ... FOR UPDATE` in store order, so two
   workers holding batches of one store take turns and never deadlock on each other; what
   the rest of the transaction reads of those stores cannot change under it;
2. each batch is checked as on SQLite (incarnation, chain anchor: sync/hub/anchor.py);
3. the accepted batches' events are copied (COPY, binary) into a per-connection temporary
   staging table and moved with `INSERT INTO events SELECT DISTINCT ON (store_id, seq) ...
   ON CONFLICT DO NOTHING RETURNING` (COPY itself has no ON CONFLICT); a staged event whose
   (store_id, seq) is held with another event_id goes to `conflicts`;
4. the ingest hooks' rows (`hub_stock_pending`, Upsert rows) are written;
5. a store whose batches did not simply continue its prefix is walked in SQL (the end of
   the contiguous run after the ack, by a window over seq) and the covered events' chain
   checked;
6. rejections and their counts, then each store's acked_seq, max_seq, ack_rev (+1 when
   acked_seq moved), incarnation, counts and last contact are updated, RETURNING the
   values that commit.

`write` returns those committed acks (`WriteResults.acks`). Nothing is published from
inside the transaction (no LISTEN/NOTIFY: it serialises commits).

The epoch (`AckState.epoch`) is the `hub_meta` 'epoch' token combined with the database's
oid, the cluster's system identifier and the current WAL timeline where readable: a dump
restored elsewhere, a point-in-time recovery or a promoted replica gives another epoch.
`edge-hub epoch --new` replaces the token (after an in-place restore). Each pool
connection reads it when it connects (a restored server drops every connection).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import AsyncConnectionPool

from common import chain
from common.errors import StorageError
from sync.hub import anchor, migrations
from sync.hub.storage import (REJECTIONS_KEPT, AckState, IngestHook, IngestResult, Incoming, Rejection,
                              WriteResults)
from sync.hub.storage import iter_bodies, result_topic, stale_detail, walk_broken_detail

log = logging.getLogger("edge_hub.pg")
T = TypeVar("T")

_STAGING = ("CREATE TEMP TABLE IF NOT EXISTS hub_staging (ord INTEGER NOT NULL, store_id TEXT NOT NULL,"
            " seq BIGINT NOT NULL, event_id TEXT NOT NULL, body BYTEA NOT NULL, received_at TEXT NOT NULL,"
            " hash BYTEA) ON COMMIT DELETE ROWS")
_STAGING_TYPES = ["int4", "text", "int8", "text", "bytea", "text", "bytea"]
_TRIM_LOCK = migrations.PG_LOCK_KEY + 1   # one worker at a time trims `rejections`
_WALK_CHUNK = 2000
_RETRIES = 5   # deadlocks and serialization failures are retried (nothing of them committed)


def display(url: str) -> str:
    """The url without its password (for messages)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable url)"
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', '5432')}/{info.get('dbname', '')}"


def pg_error(step: str, url: str, exc: BaseException) -> StorageError:
    return StorageError(f"storage: {step} on {display(url)}: {type(exc).__name__}: {str(exc).strip()[:300]}")


async def read_epoch(conn: psycopg.AsyncConnection, new: bool = False) -> str:
    """The hub record's epoch (see the module docstring); `new`: replace the token first. Commits."""
    async with conn.transaction():
        if new:
            await conn.execute("UPDATE hub_meta SET value = %s WHERE key = 'epoch'", (secrets.token_hex(8),))
        # The first opener's token wins: workers opening a new database at once agree on it.
        await conn.execute("INSERT INTO hub_meta(key, value) VALUES ('epoch', %s) ON CONFLICT(key) DO NOTHING",
                           (secrets.token_hex(8),))
        cur = await conn.execute("SELECT value FROM hub_meta WHERE key = 'epoch'")
        token = (await cur.fetchone())[0]
        cur = await conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
        oid = (await cur.fetchone())[0]
        parts = [f"p{token}", str(oid)]
        for sql in ("SELECT system_identifier FROM pg_control_system()",
                    "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"):
            try:
                async with conn.transaction():  # a savepoint: a function the role may not run
                    cur = await conn.execute(sql)
                    parts.append(str((await cur.fetchone())[0]))
            except psycopg.Error:
                parts.append("-")
    return "-".join(parts)


class PgStorage:
    """The hub's PostgreSQL database. Open with `await PgStorage.open(url, store_ids)`."""

    def __init__(self, url: str, pool: AsyncConnectionPool, epoch: str, rejections_kept: int = REJECTIONS_KEPT):
        self.url = url
        self.rejections_kept = rejections_kept
        self._pool = pool
        self._epoch = epoch
        self.ingest_hooks: list[IngestHook] = []
        self._known: set[str] = set()   # stores known to have a `stores` row (rows are never deleted)

    @classmethod
    async def open(cls, url: str, store_ids: Iterable[str] = (), pool_size: int = 4,
                   rejections_kept: int = REJECTIONS_KEPT, connect_timeout: float = 10.0) -> "PgStorage":
        """Connect, apply missing migrations, give every configured store a row; raise StorageError."""
        store_ids = set(store_ids)
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(connect_timeout)))
        except psycopg.Error as exc:
            raise pg_error("connect", url, exc) from exc
        try:
            applied = await migrations.migrate_postgres(conn)
            if applied:
                log.info("hub: PostgreSQL migrations %s applied on %s", applied, display(url))
            async with conn.transaction():
                await conn.execute("INSERT INTO stores(store_id) SELECT unnest(%s::text[])"
                                   " ON CONFLICT DO NOTHING", (sorted(store_ids),))
            epoch = await read_epoch(conn)
        except psycopg.Error as exc:
            raise pg_error("set up the hub database", url, exc) from exc
        finally:
            await conn.close()
        self = cls.__new__(cls)

        async def configure(c: psycopg.AsyncConnection) -> None:
            await c.execute(_STAGING)
            await c.commit()
            held = await read_epoch(c)
            if held != self._epoch:
                log.warning("hub: the database's epoch is now %s (was %s): its record was restored", held, self._epoch)
                self._epoch = held

        pool = AsyncConnectionPool(url, min_size=1, max_size=pool_size, open=False, configure=configure,
                                   kwargs={"connect_timeout": max(1, int(connect_timeout))},
                                   name="edge-hub", timeout=30.0)
        cls.__init__(self, url, pool, epoch, rejections_kept)
        self._known.update(store_ids)
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except Exception as exc:
            await pool.close()
            raise pg_error("open the connection pool", url, exc) from exc
        return self

    async def close(self) -> None:
        await self._pool.close()

    # ------------------------------------------------------------------ acks

    async def _query(self, sql: str, args=()) -> list[tuple]:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, args)
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise pg_error("read", self.url, exc) from exc

    async def acked(self, store_id: str) -> int:
        rows = await self._query("SELECT acked_seq FROM stores WHERE store_id = %s", (store_id,))
        return rows[0][0] if rows else 0

    async def ack_state(self, store_id: str) -> AckState:
        return (await self.ack_states([store_id]))[store_id]

    async def ack_states(self, store_ids: Iterable[str]) -> dict[str, AckState]:
        wanted = list(store_ids)
        rows = await self._query("SELECT store_id, acked_seq, ack_rev FROM stores WHERE store_id = ANY(%s)", (wanted,))
        held = {s: (a, r) for s, a, r in rows}
        return {s: AckState(*held.get(s, (0, 0)), self._epoch) for s in wanted}

    async def epoch(self) -> str:
        return self._epoch

    async def new_epoch(self) -> str:
        """Replace the epoch token (after restoring the database in place); return the new epoch."""
        async with self._pool.connection() as conn:
            self._epoch = await read_epoch(conn, new=True)
        return self._epoch

    # ---------------------------------------------------------------- ingest

    async def write(self, items: list[Incoming | Rejection], now: str) -> WriteResults:
        """Store a group in one transaction (see the module docstring); raises StorageError."""
        for attempt in range(_RETRIES):
            try:
                async with self._pool.connection() as conn:
                    async with conn.transaction():
                        return await self._write(conn, items, now)
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure) as exc:
                if attempt == _RETRIES - 1:
                    raise pg_error("store events", self.url, exc) from exc
                log.warning("hub: ingest transaction retried: %s", exc)
                await asyncio.sleep(0.01 * (attempt + 1))
            except psycopg.Error as exc:
                raise pg_error("store events", self.url, exc) from exc
        raise AssertionError("unreachable")

    async def _write(self, conn: psycopg.AsyncConnection, items: list, now: str) -> WriteResults:
        named = sorted({i.store_id for i in items if isinstance(i, Incoming) or (i.restate_ack and i.store_id)})
        state: dict[str, list] = {}   # store -> [acked, max_seq, rev, incarnation, hash at ack]
        if named:
            # Rows are never deleted: a store known to have one needs no INSERT (a round trip).
            if not self._known.issuperset(named):
                await conn.execute("INSERT INTO stores(store_id, updated_at) SELECT unnest(%s::text[]), %s"
                                   " ON CONFLICT DO NOTHING", (named, now))
            cur = await conn.execute("SELECT store_id, acked_seq, max_seq, ack_rev, incarnation FROM stores"
                                     " WHERE store_id = ANY(%s) ORDER BY store_id FOR UPDATE", (named,))
            for store_id, acked, top, rev, inc in await cur.fetchall():
                state[store_id] = [acked, top, rev, inc, chain.GENESIS if acked == 0 else None]
            if len(state) != len(named):
                raise StorageError(f"storage: stores {sorted(set(named) - set(state))} have no row in {display(self.url)}")
            self._known.update(named)
            # A statement of its own, after the locks: a row locked after waiting is its newest
            # version, but a join in the locking statement would keep the rows it read before.
            cur = await conn.execute("SELECT s.store_id, e.hash FROM stores s JOIN events e ON e.store_id = s.store_id"
                                     " AND e.seq = s.acked_seq WHERE s.store_id = ANY(%s)", (named,))
            for store_id, held in await cur.fetchall():
                state[store_id][4] = held
        before = {s: v[0] for s, v in state.items()}

        results: list[IngestResult | None] = [None] * len(items)
        rejections: list[tuple] = []
        counts: dict[str, list[int]] = {}
        walk: dict[str, IngestResult] = {}
        staged: list[tuple] = []
        first_ord: dict[tuple[str, int], int] = {}
        accepted: list[int] = []
        for ord_, item in enumerate(items):
            if isinstance(item, Rejection):
                rejections.append((now, item.topic[:300], item.store_id, item.reason, item.detail[:500]))
                continue
            store_id = item.store_id
            st = state[store_id]
            ack, top, _, inc, known = st
            count = counts.setdefault(store_id, [0, 0])
            first, last = item.events[0][0].seq, item.events[-1][0].seq
            if item.incarnation is not None and inc is not None and item.incarnation < inc:
                detail = stale_detail(first, last, item.incarnation, inc)
                rejections.append((now, item.topic[:300], store_id, "stale_incarnation", detail))
                results[ord_] = IngestResult(stale_incarnation=detail)
                continue
            if item.hashes is not None:
                at = anchor.check_at(first, len(item.hashes), ack)
                broken = None
                if at is not None:
                    theirs = known if at == ack else await self._hash_at(conn, store_id, at)
                    broken = anchor.disagreement(first, item.prev_hash, item.hashes, at, theirs)
                if broken is not None:
                    rejections.append((now, item.topic[:300], store_id, "chain_broken", broken[:500]))
                    count[1] += 1
                    results[ord_] = IngestResult(chain_broken=broken)
                    continue
                hashes = item.hashes
            else:
                count[0] += 1
                hashes = None
            if item.incarnation is not None:
                st[3] = item.incarnation
            fast = top == ack and first <= ack + 1 and store_id not in walk
            if hashes is None:
                if fast and known is not None and last > ack:
                    hashes = [None] * (ack + 1 - first) + chain.hashes(known, [b for h, b in item.events[ack + 1 - first:]])
                else:
                    hashes = [None] * len(item.events)
            for (head, body), h in zip(item.events, hashes):
                key = (store_id, head.seq)
                first_ord.setdefault(key, ord_)
                staged.append((ord_, store_id, head.seq, head.event_id, bytes(body), now, h))
            accepted.append(ord_)
            results[ord_] = IngestResult(unanchored=item.hashes is None)
            st[1] = max(top, last)
            if fast:
                if last > ack:
                    st[0], st[4] = last, hashes[-1]
            else:
                walk[store_id] = results[ord_]

        inserted: set[tuple[str, int]] = set()
        conflicts: dict[int, list] = {}
        if staged:
            async with conn.cursor() as cur:
                async with cur.copy("COPY hub_staging (ord, store_id, seq, event_id, body, received_at, hash)"
                                    " FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(_STAGING_TYPES)
                    for row in staged:
                        await copy.write_row(row)
                await cur.execute(
                    "INSERT INTO events(store_id, seq, event_id, body, received_at, hash)"
                    " SELECT DISTINCT ON (store_id, seq) store_id, seq, event_id, body, received_at, hash"
                    " FROM hub_staging ORDER BY store_id, seq, ord ON CONFLICT DO NOTHING RETURNING store_id, seq")
                inserted = {(s, q) for s, q in await cur.fetchall()}
                if len(inserted) < len(staged):
                    await cur.execute(
                        "WITH c AS (SELECT st.ord, st.store_id, st.seq, st.event_id, e.event_id AS held, st.body,"
                        " st.received_at FROM hub_staging st JOIN events e ON e.store_id = st.store_id"
                        " AND e.seq = st.seq WHERE e.event_id <> st.event_id),"
                        " kept AS (INSERT INTO conflicts(store_id, seq, event_id, held_event_id, body, received_at)"
                        " SELECT store_id, seq, event_id, held, body, received_at FROM c ON CONFLICT DO NOTHING)"
                        " SELECT ord, seq, held, event_id FROM c ORDER BY ord, seq")
                    for ord_, seq, held, sent in await cur.fetchall():
                        conflicts.setdefault(ord_, []).append((seq, held, sent))
        new_events: dict[str, list] = {}
        for ord_ in accepted:
            item, result = items[ord_], results[ord_]
            stored = [(h, b) for h, b in item.events
                      if (item.store_id, h.seq) in inserted and first_ord[(item.store_id, h.seq)] == ord_]
            result.stored, result.new_events = len(stored), stored
            result.conflicts = conflicts.get(ord_, [])
            result.duplicates = len(item.events) - len(stored) - len(result.conflicts)
            new_events.setdefault(item.store_id, []).extend(stored)

        pending: list[tuple[str, bytes]] = []
        for store_id in sorted(new_events):
            stored = new_events[store_id]
            if not stored:
                continue
            for hook in self.ingest_hooks:
                out = hook(store_id, stored)
                if out is None:
                    continue
                if isinstance(out, (bytes, bytearray)):
                    pending.append((store_id, bytes(out)))
                    continue
                async with conn.cursor() as cur:
                    for upsert in out:
                        if upsert.rows:
                            await cur.executemany(upsert.sql("%s"), upsert.rows)
        if pending:
            async with conn.cursor() as cur:
                await cur.executemany("INSERT INTO hub_stock_pending(store_id, deltas) VALUES (%s, %s)", pending)

        for store_id in sorted(walk):
            st = state[store_id]
            st[0], st[4], broken_at = await self._walk(conn, store_id, st[0], st[4])
            if broken_at is not None:
                result = walk[store_id]
                result.chain_broken = walk_broken_detail(broken_at, st[0])
                rejections.append((now, result_topic(items, store_id)[:300], store_id, "chain_broken",
                                   result.chain_broken[:500]))
                counts[store_id][1] += 1

        if rejections:
            async with conn.cursor() as cur:
                await cur.executemany("INSERT INTO rejections(received_at, topic, store_id, reason, detail)"
                                      " VALUES (%s, %s, %s, %s, %s)", rejections)
                by_reason: dict[str, int] = {}
                for row in rejections:
                    by_reason[row[3]] = by_reason.get(row[3], 0) + 1
                await cur.executemany("INSERT INTO rejection_counts(reason, count) VALUES (%s, %s)"
                                      " ON CONFLICT(reason) DO UPDATE SET count = rejection_counts.count + excluded.count",
                                      sorted(by_reason.items()))
                await cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (_TRIM_LOCK,))
                if (await cur.fetchone())[0]:
                    await cur.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - %s",
                                      (self.rejections_kept,))

        acks = {s: AckState(v[0], v[2], self._epoch) for s, v in state.items()}
        touched = sorted(counts)  # the stores with a batch in the group
        if touched:
            cur = await conn.execute(
                "UPDATE stores s SET acked_seq = v.acked, max_seq = v.top, ack_rev = s.ack_rev + v.bump,"
                " incarnation = v.inc, updated_at = %s, unanchored = s.unanchored + v.un,"
                " chain_breaks = s.chain_breaks + v.br"
                " FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::int[], %s::bigint[], %s::int[], %s::int[])"
                " AS v(store_id, acked, top, bump, inc, un, br) WHERE s.store_id = v.store_id"
                " RETURNING s.store_id, s.acked_seq, s.ack_rev",
                (now, touched, [state[s][0] for s in touched], [state[s][1] for s in touched],
                 [int(state[s][0] != before[s]) for s in touched], [state[s][3] for s in touched],
                 [counts[s][0] for s in touched], [counts[s][1] for s in touched]))
            for store_id, acked, rev in await cur.fetchall():
                acks[store_id] = AckState(acked, rev, self._epoch)
        return WriteResults(results, acks)

    @staticmethod
    async def _hash_at(conn: psycopg.AsyncConnection, store_id: str, seq: int) -> bytes | None:
        if seq == 0:
            return chain.GENESIS
        cur = await conn.execute("SELECT hash FROM events WHERE store_id = %s AND seq = %s", (store_id, seq))
        row = await cur.fetchone()
        return row[0] if row else None

    @staticmethod
    async def _walk(conn: psycopg.AsyncConnection, store_id: str, acked: int, held: bytes | None
                    ) -> tuple[int, bytes | None, int | None]:
        """Extend the prefix: its contiguous end found in SQL, the covered events' chain checked."""
        cur = await conn.execute(
            "SELECT MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS run FROM events"
            " WHERE store_id = %s AND seq > %s) t WHERE run = %s", (store_id, acked, acked))
        end = (await cur.fetchone())[0]
        if end is None:
            return acked, held, None
        if held is None:  # an unanchored history: nothing to check against
            return end, None, None
        while acked < end:
            cur = await conn.execute("SELECT seq, body, hash FROM events WHERE store_id = %s AND seq > %s"
                                     " AND seq <= %s ORDER BY seq LIMIT %s", (store_id, acked, end, _WALK_CHUNK))
            rows = await cur.fetchall()
            acked, held, broken_at, fills, stopped = anchor.advance(rows, acked, held)
            if fills:
                async with conn.cursor() as c:
                    await c.executemany("UPDATE events SET hash = %s WHERE store_id = %s AND seq = %s",
                                        [(h, store_id, seq) for seq, h in fills])
            if stopped or not rows:
                return acked, held, broken_at
        return acked, held, None

    # ----------------------------------------------------------------- other writes and reads

    async def run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """Run `await fn(conn)` in its own transaction; return its result. Raises StorageError."""
        try:
            async with self._pool.connection() as conn:
                async with conn.transaction():
                    return await fn(conn)
        except psycopg.Error as exc:
            raise pg_error("hub write", self.url, exc) from exc

    async def events_after(self, store_id: str, after_seq: int, limit: int
                           ) -> list[tuple[int, bytes, bytes | None]]:
        return [(seq, bytes(body), bytes(h) if h is not None else None) for seq, body, h in await self._query(
            "SELECT seq, body, hash FROM events WHERE store_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (store_id, after_seq, limit))]

    def iter_bodies(self, store_id: str, after_seq: int = 0, chunk: int = 5000) -> AsyncIterator[bytes]:
        return iter_bodies(self, store_id, after_seq, chunk)

    async def stats(self) -> dict:
        """As SqliteStorage.stats (sync/hub/reader.py `stats_of`), from one snapshot."""
        stores: dict[str, dict] = {}
        try:
            async with self._pool.connection() as conn:
                async with conn.transaction():
                    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    cur = await conn.execute("SELECT store_id, COUNT(*), MAX(seq) FROM events GROUP BY store_id")
                    for store_id, held, max_seq in await cur.fetchall():
                        stores[store_id] = {"events": held, "max_seq": max_seq, "acked_seq": 0, "conflicts": 0}
                    cur = await conn.execute(
                        "SELECT s.store_id, s.acked_seq, s.unanchored, s.chain_breaks, e.hash FROM stores s"
                        " LEFT JOIN events e ON e.store_id = s.store_id AND e.seq = s.acked_seq")
                    for store_id, acked, unanchored, breaks, held in await cur.fetchall():
                        row = stores.setdefault(store_id, {"events": 0, "max_seq": 0, "conflicts": 0})
                        held = chain.GENESIS if acked == 0 else held
                        row.update(acked_seq=acked, chain_hash=bytes(held).hex() if held is not None else None,
                                   unanchored_batches=unanchored, chain_breaks=breaks)
                    cur = await conn.execute("SELECT store_id, COUNT(*) FROM conflicts GROUP BY store_id")
                    for store_id, n in await cur.fetchall():
                        stores.setdefault(store_id, {"events": 0, "max_seq": 0, "acked_seq": 0})["conflicts"] = n
                    cur = await conn.execute("SELECT reason, count FROM rejection_counts")
                    rejected = dict(await cur.fetchall())
        except psycopg.Error as exc:
            raise pg_error("read", self.url, exc) from exc
        return {"stores": stores, "rejected": rejected}

    async def store_rows(self) -> list[dict]:
        rows = await self._query(
            "SELECT s.store_id, s.acked_seq, s.max_seq, s.ack_rev, s.incarnation, s.updated_at,"
            " (SELECT COUNT(*) FROM conflicts c WHERE c.store_id = s.store_id),"
            " (SELECT COUNT(*) FROM events e WHERE e.store_id = s.store_id) FROM stores s ORDER BY s.store_id")
        return [{"store_id": s, "acked_seq": a, "max_seq": m, "events": n, "rev": r, "incarnation": i,
                 "updated_at": u, "conflicts": c} for s, a, m, r, i, u, c, n in rows]
