"""Hub workers as real processes on one PostgreSQL, sharing the ingest, with real agents.

Two (and three) workers share `$share/.../P/stores/+/events`; one of them, the leader
every other cycle, is SIGKILLed again and again while the stores keep posting. Every event of every store ends at the hub exactly
once, no store's ack is ever above what the database holds, and the batches the dead
worker took are resent by the stores after their (short) ack timeout.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request

import psycopg
import pytest

from tests.support.agentproc import AgentProcess
from tests.support.net import free_port
from tests.sync.agents import post_events, sync_status, wait_synced
from tests.sync.hubproc import HubProcess

STORES = ("store-0042", "store-0043")
CYCLES = 10


def agent_for(tmp_path, broker, store_id: str) -> AgentProcess:
    work = tmp_path / store_id
    work.mkdir()
    return AgentProcess(work, store_id, sections={
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "sync": {"batch_max_events": 50, "ack_timeout_s": 1.0, "max_inflight": 4},
        "service": {"backup_interval_s": 0},
    }, wait_connected=True)


def worker(tmp_path, broker, url: str, n: int) -> tuple[HubProcess, dict]:
    hub = HubProcess(tmp_path / f"worker-{n}", broker, stores=STORES)
    env = {"EDGE_HUB__STORAGE__URL": url, "EDGE_HUB__HUB__WORKER": str(n),
           "EDGE_HUB__HUB__HTTP_PORT": str(free_port()),
           "EDGE_HUB__HUB__WORKERS_SHARED": "true", "EDGE_HUB__MQTT__SESSION_EXPIRY_S": "2"}
    return hub, env


def leading(env: dict) -> int | None:
    """The worker's edge_hub_is_leader from its /metrics (None: it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{env['EDGE_HUB__HUB__HTTP_PORT']}/metrics",
                                    timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = re.search(r"^edge_hub_is_leader\{[^}]*\} (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else None


def held(url: str) -> dict[str, tuple[int, int, int, int]]:
    """Per store: (events, distinct seqs, max seq, acked_seq) as the database holds them."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT s.store_id, COUNT(e.seq), COUNT(DISTINCT e.seq), COALESCE(MAX(e.seq), 0),"
                            " s.acked_seq FROM stores s LEFT JOIN events e ON e.store_id = s.store_id"
                            " GROUP BY s.store_id, s.acked_seq").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def local_socket(url: str) -> str:
    """The url over the cluster's unix socket when it has one: the workers' many TCP
    connections would otherwise take ephemeral ports the test's free ports come from."""
    if not os.path.exists("/var/run/postgresql/.s.PGSQL.5432"):
        return url
    return re.sub(r"@[^/]+/", "@%2Fvar%2Frun%2Fpostgresql/", url, count=1)


@pytest.mark.parametrize("workers,cycles", [(2, CYCLES), (3, 6)], ids=["two-workers", "three-workers"])
def test_workers_lose_nothing_while_one_is_killed_again_and_again(tmp_path, broker, pg_url, workers, cycles):
    started = time.monotonic()
    pg_url = local_socket(pg_url)
    hubs = [worker(tmp_path, broker, pg_url, n) for n in range(1, workers + 1)]
    for hub, env in hubs:
        hub.start(env=env)
    agents = []
    try:
        for store_id in STORES:   # one at a time: each picks its free API port as it starts
            agents.append(agent_for(tmp_path, broker, store_id))
            agents[-1].start()
        for cycle in range(cycles):
            for agent in agents:
                post_events(agent, 120)
            flags = [leading(e) for _, e in hubs]
            assert sum(f or 0 for f in flags) <= 1, f"cycle {cycle}: two snapshot publishers {flags}"
            # Every other cycle the leader dies; the others, a worker that does not lead.
            leader = next((i for i, f in enumerate(flags) if f == 1), 0)
            index = leader if cycle % 2 == 0 else (leader + 1 + cycle // 2 % (workers - 1)) % workers
            victim, env = hubs[index]
            survivors = [e for i, (_, e) in enumerate(hubs) if i != index]
            time.sleep(0.15)               # batches in flight at every worker
            victim.kill()
            # A survivor leads within the lock's retry (2 s), generous margin for a loaded machine.
            deadline = time.monotonic() + 10
            while sum(leading(e) or 0 for e in survivors) != 1:
                assert time.monotonic() < deadline, (f"cycle {cycle}: no single survivor leads"
                                                     f" ({flags}, now {[leading(e) for e in survivors]})")
                time.sleep(0.1)
            for agent in agents:
                post_events(agent, 60)
            for agent in agents:
                status = sync_status(agent)
                db = held(pg_url).get(agent.store_id, (0, 0, 0, 0))
                assert status["acked_seq"] <= db[3], f"cycle {cycle}: {agent.store_id} acked above the database"
            victim.start(env=env)
        for agent in agents:
            status = wait_synced(agent, timeout=60)
            count, distinct, top, acked = held(pg_url)[agent.store_id]
            assert (count, distinct, top, acked) == (status["last_seq"],) * 4, agent.store_id
            assert status["last_seq"] == cycles * 180
            assert status["rewinds"] == 0, "crossed acks of two workers must not rewind a store"
        resent = sum(sync_status(a)["resends"] for a in agents)
        assert resent >= 1, "the batches a killed worker took must come back through a resend"
    finally:
        for agent in agents:
            agent.kill()
        for hub, _ in hubs:
            if hub.running:
                hub.kill()
    assert time.monotonic() - started < 120
