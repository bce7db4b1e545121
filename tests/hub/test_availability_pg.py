"""The availability tables on PostgreSQL: the same SQL, the same snapshots as on SQLite.

Each test writes the same events and feeds through the modules' functions into a SQLite
file and into a PostgreSQL database (a `sqlcompat.PgConn`), then compares what the
snapshot computation (`compute`, each engine's own read connection) builds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading
import zoneinfo

import pytest

from sync import protocol
from sync.hub import availability as av
from sync.hub import captables, feeds, migrations, projection, sqlcompat
from sync.hub import caps as capcore
from sync.hub.compute import Plan, compute
from sync.hub.store import SCHEMA_SQL
from tests.sync.hubproc import hub_command

NOW = 1_795_773_600.0  # 2026-11-27T10:00:00Z
STORES = ("store-a", "store-b", "store-c")
UTC = zoneinfo.ZoneInfo("UTC")



def migrate(url: str) -> None:
    """The hub's PostgreSQL migrations (core storage and the availability tables)."""
    async def run():
        import psycopg

        async with await psycopg.AsyncConnection.connect(url) as conn:
            await migrations.migrate_postgres(conn)
    asyncio.run(run())


def body(seq: int, store_id: str, type_: str, sku: str, qty: int, **extra) -> bytes:
    event = {"seq": seq, "event_id": f"00000000-0000-7000-8000-{seq:012d}", "store_id": store_id,
             "type": type_, "occurred_at": "2026-11-27T09:00:00.000Z", "recorded_at": "2026-11-27T09:00:00.000Z",
             "command_id": f"c{seq}", "schema": 1, "sku": sku, **extra}
    if type_ in ("received", "sold"):
        event.update(qty=qty, location=extra.get("location", "floor" if type_ == "sold" else "backroom"))
    elif type_ in ("reserved", "reservation_released"):
        event.update(qty=qty, reservation_id=extra.get("reservation_id", f"r{seq}"))
    return json.dumps(event, separators=(",", ":")).encode()


def events_of(store_id: str, first: int, specs) -> list[tuple[object, bytes]]:
    out = []
    for i, (type_, sku, qty) in enumerate(specs):
        raw = body(first + i, store_id, type_, sku, qty)
        out.append((protocol.decode(raw, projection.EVENT_VIEW), raw))
    return out


def day_of(store_id: str, recorded_at: str) -> str:
    return recorded_at[:10]


class Engine:
    """One hub database (SQLite file or PostgreSQL) with the availability tables set up."""

    def __init__(self, kind: str, tmp_path, pg_url: str):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "hub.db"
            self.conn = sqlite3.connect(self.path, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(SCHEMA_SQL)
            self.plan_args = {"db_path": self.path}
        else:
            migrate(pg_url)
            self.conn = sqlcompat.connect(pg_url)
            self.plan_args = {"db_path": None, "url": pg_url}
        for setup in (projection.setup, feeds.setup, lambda c: captables.setup(c, day_of)):
            self.run(setup)

    def run(self, fn):
        return sqlcompat.in_transaction(self.conn, fn)

    def ingest(self, store_id: str, events) -> None:
        """What an ingest transaction does: the events, the pending row, the cap use."""
        def write(conn):
            conn.executemany("INSERT INTO events(store_id, seq, event_id, body, received_at) VALUES (?,?,?,?,?)",
                             [(store_id, head.seq, head.event_id, raw, "x") for head, raw in events])
            projection.apply_events(conn, store_id, events)
            captables.apply_usage(conn, store_id, events, day_of)
        self.run(write)

    def plan(self) -> Plan:
        return Plan(regions={"north": ["store-a", "store-b"], "south": ["store-c"]},
                    zones={s: UTC for s in STORES},
                    sources=[av.Source("wh-1", "Central", "warehouse", 86400, 3600),
                             av.Source("sup-x", "Supplier X", "supplier", 0, 3600)], **self.plan_args)

    def publish_round(self, now: float, confirmed=None) -> list[tuple]:
        """Fold, compute every store, record each version (as the leader does); return the snapshots."""
        previous = self.run(lambda c: (projection.fold_pending(c), projection.published(c))[1])
        snaps = compute(self.plan(), previous, set(STORES), now, 0, confirmed or {})
        for s in snaps:
            self.run(lambda c, s=s: (projection.record_published(c, s.store_id, s.version, s.digest,
                                                                 s.generated_at_ms),
                                     captables.record_grants(c, s.store_id, s.version, s.grants, None)))
        return sorted((s.store_id, s.version, s.payload, dict(s.grants)) for s in snaps)


@pytest.fixture
def engines(tmp_path, pg_url):
    made = [Engine("sqlite", tmp_path, pg_url), Engine("postgresql", tmp_path, pg_url)]
    yield made
    for e in made:
        e.conn.close()


def feed_everything(e: Engine, now_ms: int) -> None:
    e.ingest("store-a", events_of("store-a", 1, [("received", "A", 10), ("sold", "A", 3), ("received", "B", 4),
                                                 ("reserved", "A", 2)]))
    e.ingest("store-b", events_of("store-b", 1, [("received", "A", 1), ("sold", "A", 1), ("received", "C", 7)]))
    e.ingest("store-c", events_of("store-c", 1, [("received", "A", 100)]))
    e.ingest("store-a", events_of("store-a", 5, [("sold", "B", 1), ("reservation_released", "A", 2)]))
    e.run(lambda c: feeds.replace_source(c, "wh-1", 3, [("A", 50), ("Z", 2)], now_ms))
    e.run(lambda c: feeds.replace_source(c, "sup-x", 1, [("A", 40)], now_ms))
    assert not e.run(lambda c: feeds.replace_source(c, "wh-1", 2, [("A", 1)], now_ms)), "an older version is ignored"
    e.run(lambda c: feeds.apply_orders(c, "online", [("o1", "A", 5, "open"), ("o2", "Z", 1, "cancelled")], now_ms))
    e.run(lambda c: captables.set_cap(c, capcore.Cap("A", 12, "day", "chain"), "mqtt", now_ms))
    e.run(lambda c: captables.set_cap(c, capcore.Cap("B", 3, "day", "store", "store-a"), "file", now_ms))


def test_the_same_events_and_feeds_give_the_same_snapshots_on_sqlite_and_postgresql(engines):
    now_ms = int(NOW * 1000)
    for e in engines:
        feed_everything(e, now_ms)
    first = [e.publish_round(NOW) for e in engines]
    assert first[0] == first[1]
    snap = json.loads(dict((s, p) for s, _, p, _ in first[1])["store-a"])
    items = {i["sku"]: i for i in snap["items"]}
    # store-a: A 10 - 3 (the reservation of 2 released again), B 4 - 1; nearby store-b holds A 0, C 7.
    assert items["A"]["nearby"] == [{"store_id": "store-b", "available": 0}]
    assert items["A"]["sources"] == {"wh-1": 45, "sup-x": 40} and items["A"]["online"] == 45
    assert items["A"]["cap"]["scope"] == "chain" and items["B"]["cap"]["allowance"] == 3
    assert {s: g for s, _, _, g in first[1]} == {s: g for s, _, _, g in first[0]} and first[1][0][3], "grants"
    # More events after a fold: the next round agrees too, and versions grow on both.
    for e in engines:
        e.ingest("store-b", events_of("store-b", 4, [("sold", "C", 2), ("received", "A", 5)]))
        e.run(lambda c: captables.clear_cap(c, "B", "file"))
    second = [e.publish_round(NOW + 60) for e in engines]
    assert second[0] == second[1]
    assert all(v2 > v1 for (_, v1, _, _), (_, v2, _, _) in zip(first[1], second[1]))
    stock = [e.run(projection.stock) for e in engines]
    assert stock[0] == stock[1] and stock[1]["store-b"] == {"A": (-1, 6, 0), "C": (-2, 7, 0)}


def test_a_version_write_not_above_the_held_one_is_refused_on_both(engines):
    for e in engines:
        e.run(lambda c: projection.record_published(c, "store-a", 100, b"d", 1))
        with pytest.raises(projection.Fenced):
            e.run(lambda c: projection.record_published(c, "store-a", 100, b"x", 2))
        assert e.run(projection.published)["store-a"] == av.Published(100, b"d", 1)


def test_the_fold_loses_no_pending_row_that_commits_while_it_runs(engines, pg_url):
    pg = engines[1]
    writers, rows_each = 4, 60
    stop = threading.Event()
    errors: list[BaseException] = []

    def ingest(worker: int) -> None:  # each its own connection: rows commit while folds run
        conn = sqlcompat.connect(pg_url)
        try:
            for i in range(rows_each):
                events = events_of("store-a", 1 + worker * 1000 + i, [("received", "A", 1), ("received", "B", 2)])
                sqlcompat.in_transaction(conn, lambda c: projection.apply_events(c, "store-a", events))
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    def fold() -> None:
        conn = sqlcompat.connect(pg_url)
        try:
            while not stop.is_set():
                sqlcompat.in_transaction(conn, projection.fold_pending)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    folders = [threading.Thread(target=fold) for _ in range(2)]  # two folds at once too (a deposed leader's)
    threads = [threading.Thread(target=ingest, args=(w,)) for w in range(writers)]
    for t in folders + threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    for t in folders:
        t.join(60)
    assert not errors, errors
    pg.run(projection.fold_pending)
    total = writers * rows_each
    assert pg.run(projection.stock) == {"store-a": {"A": (0, total, 0), "B": (0, 2 * total, 0)}}
    assert pg.conn.execute("SELECT COUNT(*) FROM hub_stock_pending").fetchone()[0] == 0


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_replay_recomputes_a_corrupted_projection_row(engines, which):
    e = engines[which]
    e.ingest("store-a", events_of("store-a", 1, [("received", "A", 10), ("sold", "A", 3), ("received", "B", 4)]))
    e.ingest("store-a", events_of("store-a", 4, [("sold", "B", 1), ("sold", "A", 1)]))
    e.ingest("store-b", events_of("store-b", 1, [("received", "A", 9)]))
    e.run(projection.fold_pending)
    good = e.run(projection.stock)
    used = e.run(lambda c: captables.used(c, "store-a", "A", "2026-11-27", "2026-11-28"))
    assert good["store-a"] == {"A": (-4, 10, 0), "B": (-1, 4, 0)} and used == 4
    e.run(lambda c: c.execute("UPDATE hub_stock SET floor = 999 WHERE store_id = 'store-a' AND sku = 'A'"))
    e.run(lambda c: c.execute("UPDATE hub_stock SET backroom = 77 WHERE store_id = 'store-a' AND sku = 'B'"))
    e.run(lambda c: c.execute("DELETE FROM cap_sold WHERE store_id = 'store-a'"))
    # From seq 5: only A is touched by events 5.. (B's row stays as it is).
    out = e.run(lambda c: projection.rebuild_store(c, "store-a", 5,
                                                   lambda c2, s, ev: captables.apply_usage(c2, s, ev, day_of)))
    assert (out["events_read"], out["events_replayed"], out["skus"], out["changed"]) == (5, 1, 1, ["A"])
    fixed = e.run(projection.stock)
    assert fixed["store-a"] == {"A": (-4, 10, 0), "B": (-1, 77, 0)} and fixed["store-b"] == good["store-b"]
    assert e.run(lambda c: captables.used(c, "store-a", "A", "2026-11-27", "2026-11-28")) == 4
    out = e.run(lambda c: projection.rebuild_store(c, "store-a", 1,
                                                   lambda c2, s, ev: captables.apply_usage(c2, s, ev, day_of)))
    assert out["changed"] == ["B"] and e.run(projection.stock) == good
    assert e.run(lambda c: captables.used(c, "store-a", "B", "2026-11-27", "2026-11-28")) == 1


def replay_cli(tmp_path, e: Engine, *args: str) -> subprocess.CompletedProcess:
    storage = f'url = "{e.plan_args["url"]}"' if e.kind == "postgresql" else f'path = "{e.path}"'
    config = tmp_path / f"hub-{e.kind}.toml"
    config.write_text(f"[storage]\n{storage}\n" + "".join(f'[[stores]]\nid = "{s}"\n' for s in STORES))
    return subprocess.run([*hub_command(), "replay", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
def test_edge_hub_replay_rebuilds_the_store_and_the_next_snapshot_shows_it(tmp_path, engines, which):
    e = engines[which]
    e.ingest("store-a", events_of("store-a", 1, [("received", "A", 10), ("sold", "A", 3)]))
    before = dict((s, p) for s, _, p, _ in e.publish_round(NOW))
    e.run(lambda c: c.execute("UPDATE hub_stock SET backroom = 500 WHERE store_id = 'store-a' AND sku = 'A'"))
    corrupted = dict((s, p) for s, _, p, _ in e.publish_round(NOW + 1))
    assert corrupted["store-b"] != before["store-b"], "store-b's nearby shows the corrupted row"
    if e.kind == "sqlite":
        e.conn.close()  # the hub stopped: replay refuses while another process has hub.db open
        holder = sqlite3.connect(e.path, isolation_level=None)
        holder.execute("SELECT COUNT(*) FROM events").fetchone()
        refused = replay_cli(tmp_path, e, "--store", "store-a")
        assert refused.returncode == 3 and "stop the hub" in refused.stderr, refused
        holder.close()
    bad = replay_cli(tmp_path, e, "--store", "store-zz")
    assert bad.returncode == 2 and "--store" in bad.stderr, bad
    done = replay_cli(tmp_path, e, "--store", "store-a", "--from", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"changed": None} == {
        "store_id": "store-a", "from_seq": 2, "events_read": 2, "events_replayed": 1, "skus": 1,
        "rows_changed": 1, "changed": None}
    if e.kind == "sqlite":
        e.conn = sqlite3.connect(e.path, isolation_level=None)
    after = dict((s, p) for s, _, p, _ in e.publish_round(NOW + 2))
    assert json.loads(after["store-b"])["items"] == json.loads(before["store-b"])["items"]
    assert json.loads(after["store-b"])["version"] > json.loads(corrupted["store-b"])["version"]
