"""insert_rows: multi-row VALUES statements with the effect of executemany."""

import sqlite3

import pytest

from common.sqlite import INSERT_CHUNK, insert_rows

UPSERT_TAIL = " ON CONFLICT(k) DO UPDATE SET n = n + excluded.n"


def _table() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT, n INTEGER NOT NULL)")
    return conn


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, INSERT_CHUNK - 1, INSERT_CHUNK, INSERT_CHUNK + 1, 3 * INSERT_CHUNK + 5])
def test_insert_rows_stores_what_executemany_stores(count):
    rows = [(i, f"v{i}", i % 3) for i in range(count)]
    ours, plain = _table(), _table()
    insert_rows(ours, "INSERT INTO t(k, v, n)", rows)
    plain.executemany("INSERT INTO t(k, v, n) VALUES (?,?,?)", rows)
    query = "SELECT k, v, n FROM t ORDER BY k"
    assert ours.execute(query).fetchall() == plain.execute(query).fetchall() == sorted(rows)


def test_insert_rows_applies_the_tail_to_every_chunk():
    conn = _table()
    rows = [(i % 10, "x", 1) for i in range(INSERT_CHUNK + 40)]  # 29 or 30 hits on each of 10 keys
    insert_rows(conn, "INSERT INTO t(k, v, n)", rows[:1] + rows[10:], UPSERT_TAIL)  # rows[10:] revisit keys 0..9
    insert_rows(conn, "INSERT INTO t(k, v, n)", rows[1:10], UPSERT_TAIL)
    counts = dict(conn.execute("SELECT k, n FROM t"))
    assert counts == {k: sum(1 for r in rows if r[0] == k) for k in range(10)}


def test_a_failing_chunk_raises():
    conn = _table()
    with pytest.raises(sqlite3.IntegrityError):
        insert_rows(conn, "INSERT INTO t(k, v, n)", [(1, "a", 1), (1, "b", 1)])
