"""A log written before leases, caps and time marks is brought to the current schema at open."""

from __future__ import annotations

import sqlite3

from agent import events as ev
from agent.log import SqliteEventLog
from agent.verify import verify_log

TIMES = iter(f"2026-12-03T10:{m:02d}:00.000Z" for m in range(60))


async def test_an_old_log_gains_lease_columns_cap_usage_and_time_marks(tmp_path):
    path = tmp_path / "events.db"
    log = await SqliteEventLog.open(path, "s1", now=lambda: next(TIMES))
    for n, intents in enumerate([
        [ev.Receive(sku="A", qty=10, location="floor")],
        [ev.Sell(sku="A", qty=2), ev.Reserve(sku="A", qty=3, reservation_id="r1")],
        [ev.Reserve(sku="A", qty=1, reservation_id="r2")],
        [ev.ReleaseReservation(reservation_id="r1")],
    ]):
        await log.append(ev.AppendCommand(f"c{n}", intents))
    await log.close()
    conn = sqlite3.connect(path)
    expected = {
        "usage": conn.execute("SELECT sku, slot, qty FROM cap_usage ORDER BY slot").fetchall(),
        "times": conn.execute("SELECT reservation_id, opened_at FROM reservations ORDER BY 1").fetchall(),
        "marks": conn.execute("SELECT high, seq FROM time_marks ORDER BY seq").fetchall(),
    }
    assert expected["usage"] and len(expected["marks"]) == 4
    # Make it look like a log of an agent from before these tables and columns.
    conn.executescript("""
        DROP INDEX reservations_by_expiry;
        ALTER TABLE reservations DROP COLUMN opened_at;
        ALTER TABLE reservations DROP COLUMN expires_at;
        DROP TABLE cap_usage;
        DROP TABLE time_marks;
    """)
    conn.close()
    log = await SqliteEventLog.open(path, "s1")
    await log.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT sku, slot, qty FROM cap_usage ORDER BY slot").fetchall() == expected["usage"]
    assert conn.execute("SELECT reservation_id, opened_at FROM reservations ORDER BY 1").fetchall() == expected["times"]
    assert conn.execute("SELECT high, seq FROM time_marks ORDER BY seq").fetchall() == expected["marks"]
    conn.close()
    report = verify_log(path)
    assert report.ok, report.render()


async def test_verify_finds_cap_usage_that_is_not_what_the_events_give(tmp_path):
    path = tmp_path / "events.db"
    log = await SqliteEventLog.open(path, "s1")
    await log.append(ev.AppendCommand("c1", [ev.Sell(sku="A", qty=2)]))
    await log.close()
    assert verify_log(path).ok
    conn = sqlite3.connect(path)
    conn.execute("UPDATE cap_usage SET qty = 1")
    conn.commit()
    conn.close()
    report = verify_log(path)
    assert not report.ok and "cap_usage" in report.render()
