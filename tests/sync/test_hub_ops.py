"""A real `edge-hub run` with `hub.http_port`: /healthz, /metrics, `edge-hub stores`, marked acks."""

import json
import sqlite3
import urllib.error
import urllib.request

from tests.support.net import free_port
from tests.sync.agents import assert_healed, post_events, sync_agent
from tests.sync.hubproc import HubProcess
from tests.sync.helpers import wait_until


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_worker_serves_health_metrics_and_the_stores_table(tmp_path, broker):
    port = free_port()
    hub = HubProcess(tmp_path / "hub", broker, stores=("store-0042", "store-0043"))
    hub.start(env={"EDGE_HUB__HUB__HTTP_PORT": str(port)})
    try:
        with sync_agent(tmp_path, broker) as agent:
            post_events(agent, 250)
            assert assert_healed(agent, hub, verify=False) == 250
            status, body = get(port, "/healthz")
            assert status == 200 and json.loads(body)["ok"] is True
            status, metrics = get(port, "/metrics")
            assert status == 200
            assert 'edge_hub_events_ingested_total{worker="0"} 250.0' in metrics
            assert 'edge_hub_ack_lag_events{store_id="store-0042"} 0.0' in metrics
            assert 'edge_hub_acked_seq{store_id="store-0042"} 250.0' in metrics
            assert 'edge_hub_is_leader{worker="0"} 1.0' in metrics
            lines = {row["store_id"]: row for row in map(json.loads, hub._cli("stores").splitlines())}
            assert (lines["store-0042"]["acked_seq"], lines["store-0042"]["backlog_estimate"]) == (250, 0)
            assert lines["store-0042"]["rev"] >= 1 and lines["store-0042"]["last_contact"] is not None
            assert lines["store-0043"]["acked_seq"] == 0
            # The agent keeps the hub's mark of its last ack with the cursor.
            agent_db = next((tmp_path / "agent").rglob("*sync.db"))
            conn = sqlite3.connect(agent_db)
            try:
                epoch, rev = conn.execute("SELECT ack_epoch, ack_rev FROM cursor").fetchone()
            finally:
                conn.close()
            assert epoch and rev == lines["store-0042"]["rev"]
        hub.kill()
        wait_until(lambda: not hub.running, what="the hub gone")
        try:
            get(port, "/healthz")
            raise AssertionError("the killed hub still answers")
        except (urllib.error.URLError, ConnectionError):
            pass
    finally:
        if hub.running:
            hub.kill()
