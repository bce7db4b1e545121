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


# ----------------------------------------------------------- two hub workers' publishers


def worker_config(tmp_path, broker, url: str, worker: int):
    from sync.hub.settings import load_hub_config

    path = tmp_path / f"hub-{worker}.toml"
    path.write_text(
        f'[hub]\nid = "w{worker}"\n[storage]\nurl = "{url}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        '[availability]\npublish_interval_s = 3600\n'
        '[[stores]]\nid = "store-a"\nregion = "north"\n[[stores]]\nid = "store-b"\nregion = "north"\n')
    return load_hub_config(path, environ={})


async def test_two_workers_publishers_exactly_one_publishes_and_a_deposed_one_publishes_nothing(
        tmp_path, broker, url, pg_admin):
    from sync.hub.publisher import AvailabilityPublisher
    from sync.hub.service import HubService
    from sync.hub.store import Incoming
    from tests.availability.hubfeeds import Snapshots
    from tests.availability.test_hub_snapshots import event

    workers = []
    try:
        for n in (1, 2):
            service = await HubService.open(worker_config(tmp_path, broker, url, n))
            leader = leadership.PgLeader(url, RETRY_S, name=f"w{n}")
            publisher = await AvailabilityPublisher.attach(service, now=lambda: time.time(), leader=leader)
            await service.mqtt.start()
            await service.mqtt.wait_subscribed(10)
            workers.append((service, publisher, leader))
        (s1, p1, l1), (s2, p2, l2) = workers
        assert [await l1.step(), await l2.step()] == [True, False]
        # Events ingested by the non-leader count in the leader's snapshot.
        await s2.store.write([Incoming("store-a", [event(1, "store-a", "received", "A", 5)])], "x")
        async with Snapshots(broker) as seen:
            one, two = await p1.publish_changed(), await p2.publish_changed()
            assert sorted(s.store_id for s in one) == ["store-a", "store-b"] and two == []
            snap = await seen.wait("store-b", lambda items: "A" in items)
            assert snap["items"][0]["nearby"] == [{"store_id": "store-a", "available": 5}]
            # The leader's lock connection is terminated; worker 2 takes over; worker 1, not yet
            # aware, tries to publish a change: its version write is fenced, nothing goes out.
            pg_admin.execute("SELECT pg_terminate_backend(%s)", (l1.backend_pid,))
            await until_leads(l2, 5)
            await s1.store.write([Incoming("store-a", [event(2, "store-a", "received", "A", 1)])], "x")
            count = {s: len(seen.got[s]) for s in seen.got}
            assert l1.is_leader and await p1.publish_changed() == []
            assert p1.counters["availability_fenced"] == 1
            published = await p2.publish_changed()  # the new leader republishes every store
            assert sorted(s.store_id for s in published) == ["store-a", "store-b"]
            snap = await seen.wait("store-b", lambda items: items["A"]["nearby"][0]["available"] == 6)
            assert snap["version"] > seen.got["store-b"][0]["version"]
            assert {s: len(seen.got[s]) for s in seen.got} == {s: count[s] + 1 for s in count}
    finally:
        for service, publisher, leader in workers:
            await leader.close()
            await service.mqtt.stop()
            await service.close()
            if publisher.db is not service.store:
                publisher.db.close()
