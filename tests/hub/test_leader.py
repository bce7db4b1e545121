"""One leader at a time on PostgreSQL: the advisory lock, its fence, and takeover after a death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from sync.hub import leader as leadership
from sync.hub import projection, sqlcompat
from tests.hub.test_availability_pg import migrate

RETRY_S = 0.3


def record(url: str, leader, store_id: str, version: int) -> None:
    conn = sqlcompat.connect(url)
    try:
        sqlcompat.in_transaction(conn, lambda c: projection.record_published(
            c, store_id, version, b"d%d" % version, version, leader.fence()))
    finally:
        conn.close()


def held(url: str, store_id: str):
    conn = sqlcompat.connect(url)
    try:
        return projection.published(conn).get(store_id)
    finally:
        conn.close()


async def until_leads(leader, timeout: float) -> float:
    """Step `leader` every RETRY_S until it leads; return the seconds it took."""
    started = time.monotonic()
    while not await leader.step():
        assert time.monotonic() - started < timeout, f"no leadership within {timeout} s"
        await asyncio.sleep(RETRY_S)
    return time.monotonic() - started


@pytest.fixture
def url(pg_url):
    migrate(pg_url)
    return pg_url


def test_the_sqlite_hub_is_always_the_leader_and_needs_no_fence():
    sole = leadership.leader_for("")
    assert isinstance(sole, leadership.SoleLeader) and sole.is_leader and sole.fence() == ("1 = 1", ())


async def test_of_two_contending_workers_exactly_one_leads_and_only_its_version_write_passes(url):
    a, b = leadership.PgLeader(url, RETRY_S), leadership.PgLeader(url, RETRY_S)
    try:
        results = [await a.step(), await b.step(), await a.step(), await b.step()]
        assert results == [True, False, True, False]
        await asyncio.to_thread(record, url, a, "store-a", 10)
        with pytest.raises(projection.Fenced):  # b is not the leader: its write changes nothing
            await asyncio.to_thread(record, url, b, "store-a", 11)
        with pytest.raises(projection.Fenced):  # the leader's own write is still guarded by version < new
            await asyncio.to_thread(record, url, a, "store-a", 10)
        assert (await asyncio.to_thread(held, url, "store-a")).version == 10
    finally:
        await a.close()
        await b.close()
    # The leader closes (a clean stop): the other takes over at its next try.
    b = leadership.PgLeader(url, RETRY_S)
    try:
        assert await b.step()
    finally:
        await b.close()


async def test_a_deposed_leaders_version_write_is_refused_and_it_steps_down(url, pg_admin):
    a, b = leadership.PgLeader(url, RETRY_S), leadership.PgLeader(url, RETRY_S)
    try:
        assert await a.step() and not await b.step()
        await asyncio.to_thread(record, url, a, "store-a", 100)
        # Its lock connection is terminated: PostgreSQL releases the lock with the backend.
        pg_admin.execute("SELECT pg_terminate_backend(%s)", (a.backend_pid,))
        took = await until_leads(b, 5)
        assert took < 3 * RETRY_S + 1
        assert a.is_leader, "a has not checked its connection yet: it still believes it leads"
        with pytest.raises(projection.Fenced):  # a higher version, but a no longer holds the lock
            await asyncio.to_thread(record, url, a, "store-a", 10_000)
        await asyncio.to_thread(record, url, b, "store-a", 200)
        assert (await asyncio.to_thread(held, url, "store-a")).version == 200
        assert not await a.step() and not a.is_leader, "its next check finds the connection gone"
        assert not await a.step(), "and it does not get the lock back while b holds it"
    finally:
        await a.close()
        await b.close()


LEADER_PROCESS = """
import asyncio, sys, time
from sync.hub.leader import PgLeader

async def main():
    leader = PgLeader(sys.argv[1], 0.3)
    while not await leader.step():
        await asyncio.sleep(0.3)
    print("leading", leader.backend_pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_sigkilled_leader_process_is_replaced_within_the_retry_interval(url):
    proc = subprocess.Popen([sys.executable, "-c", LEADER_PROCESS, url], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    b = leadership.PgLeader(url, RETRY_S)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.startswith("leading"), line
        for _ in range(3):
            assert not await b.step()
            await asyncio.sleep(RETRY_S)
        task = asyncio.create_task(b.run())  # the worker's own loop: a try every RETRY_S
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        while not b.is_leader:
            assert time.monotonic() - killed < 5, "no takeover within 5 s of the SIGKILL"
            await asyncio.sleep(0.02)
        took = time.monotonic() - killed
        assert took < 2 * RETRY_S + 1, took
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not b.is_leader, "a stopped worker gives the leadership up"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await b.close()
