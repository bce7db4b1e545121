"""One contract for the hub's storage, run against SQLite and PostgreSQL (sync/hub/storage.py).

PostgreSQL: a fresh database per test on the local cluster (tests/support/pg.py; skipped
when unreachable, a failure with CI=true).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sync.hub import migrations
from sync.hub.storage import Rejection, Upsert
from sync.hub.store import SqliteStorage
from tests.hub.storage_support import A, B, NOW, bodies, incoming, sql, true_hash

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    """An `open()` for the engine: each call opens another storage on the same database."""
    opened = []
    if request.param == "sqlite":
        async def open_(stores=(A, B), **kw):
            storage = await SqliteStorage.open(tmp_path / "hub.db", stores, **kw)
            opened.append(storage)
            return storage
    else:
        url = request.getfixturevalue("pg_url")
        from sync.hub.pg import PgStorage

        async def open_(stores=(A, B), **kw):
            storage = await PgStorage.open(url, stores, pool_size=2, **kw)
            opened.append(storage)
            return storage
        open_.url = url
    open_.engine = request.param
    open_.opened = opened
    return open_


@pytest.fixture
async def store(engine):
    storage = await engine()
    yield storage
    for s in engine.opened:
        await s.close()


async def test_a_batch_stored_again_only_counts_duplicates(store):
    first = await store.write([incoming(1, 5)], NOW)
    assert (first[0].stored, first[0].duplicates, first[0].conflicts) == (5, 0, [])
    again = await store.write([incoming(1, 5), incoming(3, 7)], NOW)
    assert [(r.stored, r.duplicates) for r in again] == [(0, 5), (2, 3)]
    assert [seq for seq, _, _ in await store.events_after(A, 0, 100)] == [1, 2, 3, 4, 5, 6, 7]
    assert (await sql(store, "SELECT COUNT(*) FROM events"))[0][0] == 7
    assert again.acks[A].acked_seq == await store.acked(A) == 7


async def test_the_same_seq_with_another_event_id_is_a_conflict_kept_out(store):
    await store.write([incoming(1, 3)], NOW)
    results = await store.write([incoming(2, 4, anchored=False, event_id="other")], NOW)
    assert [(seq, sent) for seq, _, sent in results[0].conflicts] == [(2, "other-2"), (3, "other-3")]
    assert results[0].stored == 1 and results[0].duplicates == 0
    held = await store.events_after(A, 0, 10)
    assert [b for _, b, _ in held[:3]] == bodies(1, 3)
    assert (await store.stats())["stores"][A]["conflicts"] == 2
    assert {row["store_id"]: row["conflicts"] for row in await store.store_rows()}[A] == 2


async def test_events_after_a_gap_are_held_and_counted_once_it_fills(store):
    held = await store.write([incoming(4, 6), incoming(8, 9, anchored=False)], NOW)
    assert [r.stored for r in held] == [3, 2]
    assert held.acks[A].acked_seq == 0, "4..6 alone is after a gap"
    filled = await store.write([incoming(1, 3, anchored=False)], NOW)
    assert filled.acks[A].acked_seq == await store.acked(A) == 6, "the prefix stops at the gap before 8"
    filled = await store.write([incoming(7, 7)], NOW)
    assert filled.acks[A].acked_seq == 9
    rows = await store.events_after(A, 0, 100)
    assert [seq for seq, _, _ in rows] == list(range(1, 10))
    assert [h for _, _, h in rows] == [true_hash(A, s) for s in range(1, 10)], "hashes filled in by the walk"
    assert (await store.stats())["stores"][A]["chain_hash"] == true_hash(A, 9).hex()


async def test_the_ack_is_the_contiguous_prefix_and_its_rev_moves_only_with_it(store):
    epoch = await store.epoch()
    a = await store.write([incoming(1, 2), incoming(1, 1, B)], NOW)
    assert (a.acks[A].acked_seq, a.acks[A].rev, a.acks[A].epoch) == (2, 1, epoch)
    assert (a.acks[B].acked_seq, a.acks[B].rev) == (1, 1)
    same = await store.write([incoming(1, 2)], NOW)
    assert (same.acks[A].acked_seq, same.acks[A].rev) == (2, 1), "a duplicate moves nothing"
    gap = await store.write([incoming(5, 6)], NOW)
    assert (gap.acks[A].acked_seq, gap.acks[A].rev) == (2, 1), "held after a gap: not acked"
    fill = await store.write([incoming(3, 3), incoming(4, 4)], NOW)
    assert (fill.acks[A].acked_seq, fill.acks[A].rev) == (6, 2), "one transaction: one rev"
    assert B not in fill.acks
    assert await store.ack_states([A, B, "store-z"]) == {
        A: fill.acks[A], B: a.acks[B], "store-z": type(fill.acks[A])(0, 0, epoch)}
    assert await store.ack_state(B) == a.acks[B]


async def test_a_batch_from_an_older_incarnation_is_refused_and_the_ack_restated(store):
    await store.write([incoming(1, 2, incarnation=2)], NOW)
    stale = await store.write([incoming(3, 4, incarnation=1)], NOW)
    assert "incarnation 1" in stale[0].stale_incarnation and "holds incarnation 2" in stale[0].stale_incarnation
    assert stale[0].stored == 0
    assert stale.acks[A].acked_seq == 2, "the refused batch's store gets its current ack"
    assert [seq for seq, _, _ in await store.events_after(A, 0, 10)] == [1, 2]
    old = await store.write([incoming(3, 4)], NOW)
    assert old[0].stored == 2, "a batch without incarnation (an older agent) is not checked"
    newer = await store.write([incoming(5, 6, incarnation=3)], NOW)
    assert newer[0].stored == 2 and newer.acks[A].acked_seq == 6
    assert {r["store_id"]: r["incarnation"] for r in await store.store_rows()}[A] == 3
    assert (await store.stats())["rejected"] == {"stale_incarnation": 1}


async def test_a_chain_that_does_not_continue_the_hubs_is_refused_whole(store):
    await store.write([incoming(1, 3)], NOW)
    forged = incoming(3, 5, event_id="forged", prev=true_hash(A, 2))  # seq 3 rewritten, chain recomputed
    results = await store.write([forged, Rejection(forged.topic, A, "chain_invalid", "bodies do not chain",
                                                   restate_ack=True)], NOW)
    assert "the chain at seq 3" in results[0].chain_broken and results[0].stored == 0
    assert results[1] is None and results.acks[A].acked_seq == 3
    assert [seq for seq, _, _ in await store.events_after(A, 0, 10)] == [1, 2, 3]
    assert (await store.stats())["stores"][A]["chain_breaks"] == 1
    # Held after a gap, then the gap fills: the ack stops before the event that breaks the chain.
    await store.write([incoming(6, 8, event_id="forged", prev=bytes(32))], NOW)
    walked = await store.write([incoming(4, 5)], NOW)
    assert walked.acks[A].acked_seq == 5 and "seq 6" in walked[0].chain_broken
    assert (await store.stats())["rejected"] == {"chain_broken": 2, "chain_invalid": 1}


async def test_rejections_keep_the_newest_rows_and_count_every_one(store):
    store.rejections_kept = 3
    for n in range(5):
        await store.write([Rejection("retail/P/stores/x/events", None, "unknown_store", f"n{n}"),
                           Rejection("t", A, "too_far_ahead", f"m{n}", restate_ack=True)], NOW)
    assert (await store.stats())["rejected"] == {"unknown_store": 5, "too_far_ahead": 5}
    kept = await sql(store, "SELECT detail FROM rejections ORDER BY id")
    assert [d for (d,) in kept] == ["m3", "n4", "m4"]


async def test_events_after_reads_in_seq_order_with_the_hubs_hashes(store):
    await store.write([incoming(1, 7), incoming(1, 2, B)], NOW)
    page = await store.events_after(A, 2, 3)
    assert [(seq, body, h) for seq, body, h in page] == [
        (s, b, true_hash(A, s)) for s, b in zip(range(3, 6), bodies(3, 5))]
    assert [b async for b in store.iter_bodies(A, 5)] == bodies(6, 7)
    assert await store.events_after(B, 2, 10) == []


async def _create_hook_tables(store, engine) -> None:
    ddl = "CREATE TABLE IF NOT EXISTS hook_rows (store_id TEXT NOT NULL, k TEXT NOT NULL, n INTEGER NOT NULL," \
          " PRIMARY KEY (store_id, k))"
    await sql(store, ddl)
    if engine.engine == "sqlite":  # the projection's table (created by projection.setup on SQLite)
        await sql(store, "CREATE TABLE IF NOT EXISTS hub_stock_pending (id INTEGER PRIMARY KEY,"
                         " store_id TEXT NOT NULL, deltas BLOB NOT NULL)")


async def test_hooks_rows_commit_with_the_events_and_a_failing_hook_stores_nothing(store, engine):
    await _create_hook_tables(store, engine)
    seen = []
    store.ingest_hooks.append(lambda store_id, events: seen.append((store_id, [h.seq for h, _ in events])) or
                              b"deltas:" + store_id.encode())
    store.ingest_hooks.append(lambda store_id, events: [Upsert("hook_rows", ("store_id", "k", "n"), ("store_id", "k"),
                                                               [(store_id, "events", len(events))], add=("n",))])
    await store.write([incoming(1, 3), incoming(2, 4), incoming(1, 1, B)], NOW)
    assert sorted(seen) == [(A, [1, 2, 3, 4]), (B, [1])], "once per store, only the events stored now"
    await store.write([incoming(1, 4)], NOW)
    assert len(seen) == 2, "a group that stores nothing calls no hook"
    assert sorted(await sql(store, "SELECT store_id, deltas FROM hub_stock_pending")) == [
        (A, b"deltas:store-a"), (B, b"deltas:store-b")]
    assert sorted(await sql(store, "SELECT store_id, n FROM hook_rows")) == [(A, 4), (B, 1)]

    def fail(store_id, events):
        raise RuntimeError("hook failed")

    store.ingest_hooks.append(fail)
    with pytest.raises(Exception, match="hook failed"):
        await store.write([incoming(5, 6), Rejection("t", A, "too_far_ahead", "x", restate_ack=True)], NOW)
    assert await store.acked(A) == 4 and (await store.ack_state(A)).rev == 1
    assert [seq for seq, _, _ in await store.events_after(A, 4, 10)] == []
    assert len(await sql(store, "SELECT * FROM hub_stock_pending")) == 2
    assert sorted(await sql(store, "SELECT store_id, n FROM hook_rows")) == [(A, 4), (B, 1)]
    assert (await store.stats())["rejected"] == {}, "the group's rejection rolled back too"
    store.ingest_hooks.remove(fail)
    assert (await store.write([incoming(5, 6)], NOW)).acks[A].acked_seq == 6


async def test_reopening_applies_no_migration_twice_and_keeps_everything(store, engine):
    await store.write([incoming(1, 3, incarnation=1), incoming(5, 5)], NOW)
    before = await sql(store, "SELECT version, name FROM schema_migrations ORDER BY version")
    core = migrations.SQLITE if engine.engine == "sqlite" else migrations.POSTGRES
    assert [v for v, _ in before][:len(core)] == [m.version for m in core]
    epoch = await store.epoch()
    await store.close()
    engine.opened.remove(store)
    again = await engine()
    assert await sql(again, "SELECT version, name FROM schema_migrations ORDER BY version") == before
    state = await again.ack_state(A)
    assert (state.acked_seq, state.rev) == (3, 1)
    if engine.engine == "sqlite":
        assert state.epoch != epoch, "SQLite: a new epoch each open"
    else:
        assert state.epoch == epoch, "PostgreSQL: the record's epoch stays"
    assert (await again.write([incoming(4, 4)], NOW)).acks[A].acked_seq == 5
    stale = await again.write([incoming(6, 6, incarnation=0)], NOW)
    assert stale[0].stale_incarnation is not None, "the incarnation survived the reopen"


async def test_a_sqlite_database_from_before_migrations_opens_unchanged_then_migrates(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    # The layout before chain hashes and rejection counts (no events.hash, no stores.unanchored).
    conn.executescript("""
        CREATE TABLE events (store_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL,
            body BLOB NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (store_id, seq)) WITHOUT ROWID;
        CREATE TABLE stores (store_id TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL, updated_at TEXT NOT NULL)
            WITHOUT ROWID;
        CREATE TABLE conflicts (store_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL,
            held_event_id TEXT NOT NULL, body BLOB NOT NULL, received_at TEXT NOT NULL,
            PRIMARY KEY (store_id, seq, event_id)) WITHOUT ROWID;
        CREATE TABLE rejections (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL, topic TEXT NOT NULL,
            store_id TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL);
    """)
    assert "hash" not in {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    for seq, raw in zip(range(1, 4), bodies(1, 3)):
        conn.execute("INSERT INTO events(store_id, seq, event_id, body, received_at) VALUES (?,?,?,?,?)",
                     (A, seq, f"00000000-0000-7000-8000-{seq:012d}", raw, NOW))
    conn.execute("INSERT INTO stores(store_id, acked_seq, updated_at) VALUES (?, 3, ?)", (A, NOW))
    conn.execute("INSERT INTO rejections(received_at, topic, reason, detail) VALUES (?, 't', 'undecodable', 'x')",
                 (NOW,))
    conn.close()
    store = await SqliteStorage.open(path, [A])
    try:
        assert await store.acked(A) == 3
        assert (await store.stats())["rejected"] == {"undecodable": 1}
        assert [v for v, _ in await sql(store, "SELECT version, name FROM schema_migrations")] == [
            m.version for m in migrations.sqlite_migrations()]
        assert (await store.write([incoming(4, 4, anchored=False)], NOW)).acks[A].acked_seq == 4
    finally:
        await store.close()


# --------------------------------------------------------------- concurrency (PostgreSQL)


def _check_acks(seen: list[tuple[str, int, int]], final: dict[str, int]) -> None:
    """Every ack a writer was given was committed: per store, a higher rev never has a lower ack,
    one rev one ack, and none above the final prefix."""
    by_store: dict[str, dict[int, int]] = {}
    for store_id, acked, rev in seen:
        held = by_store.setdefault(store_id, {}).setdefault(rev, acked)
        assert held == acked, f"{store_id}: rev {rev} given as both {held} and {acked}"
    for store_id, revs in by_store.items():
        ordered = [revs[r] for r in sorted(revs)]
        assert ordered == sorted(ordered), f"{store_id}: an ack went back: {ordered}"
        assert ordered[-1] <= final[store_id]


@pytest.fixture
def pg_engine(pg_url):
    """`open()` for PgStorage instances on one fresh database (the workers of one hub)."""
    from sync.hub.pg import PgStorage

    opened = []

    async def open_(stores=(A, B)):
        storage = await PgStorage.open(pg_url, stores, pool_size=2)
        opened.append(storage)
        return storage
    open_.url, open_.opened = pg_url, opened
    return open_


@pytest.fixture
async def pg_opened(pg_engine):
    yield pg_engine
    for s in pg_engine.opened:
        await s.close()


async def test_two_storages_writing_the_same_stores_at_once_never_move_an_ack_wrongly(pg_opened):
    from tests.hub.pg_writer import plan

    one, two = await pg_opened(), await pg_opened()
    seen: list[tuple[str, int, int]] = []

    async def writer(storage, seed):
        for rounds in (seed, seed + 10):
            for group in plan(rounds, 60, [A, B]):
                results = await storage.write(group, NOW)
                seen.extend((s, a.acked_seq, a.rev) for s, a in results.acks.items())

    await asyncio.gather(writer(one, 1), writer(two, 2))
    final = {s: st.acked_seq for s, st in (await one.ack_states([A, B])).items()}
    assert final == {A: 60, B: 60}
    _check_acks(seen, final)
    assert await sql(one, "SELECT store_id, COUNT(*), COUNT(DISTINCT seq) FROM events GROUP BY 1 ORDER BY 1") == [
        (A, 60, 60), (B, 60, 60)]
    assert await sql(one, "SELECT COUNT(*) FROM conflicts") == [(0,)]
    assert [h for _, _, h in await one.events_after(A, 0, 100)] == [true_hash(A, s) for s in range(1, 61)]


async def test_two_processes_writing_the_same_stores_never_move_an_ack_wrongly(pg_opened):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.hub.pg_writer", pg_opened.url, str(seed), "80", A, B],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (3, 4)]
    seen = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        seen.extend(tuple(json.loads(line)) for line in out.splitlines())
    storage = await pg_opened()
    final = {s: st.acked_seq for s, st in (await storage.ack_states([A, B])).items()}
    assert final == {A: 80, B: 80}
    _check_acks(seen, final)
    assert await sql(storage, "SELECT store_id, COUNT(*) FROM events GROUP BY 1 ORDER BY 1") == [(A, 80), (B, 80)]
    assert (await storage.stats())["stores"][A]["chain_hash"] == true_hash(A, 80).hex()


async def test_workers_opening_a_new_database_at_once_apply_each_migration_once(pg_opened):
    opened = await asyncio.gather(*(pg_opened() for _ in range(3)))
    rows = await sql(opened[0], "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in rows] == [m.version for m in migrations.postgres_migrations()]
    assert len({await s.epoch() for s in opened}) == 1, "every worker names the same record"


async def test_a_new_epoch_replaces_the_token_and_survives_a_reopen(pg_opened):
    storage = await pg_opened()
    old = await storage.epoch()
    new = await storage.new_epoch()
    assert new != old and new.split("-")[1:] == old.split("-")[1:], "same database identity, new token"
    assert await (await pg_opened()).epoch() == new
