"""Availability end to end: real mosquitto, real `edge-hub run` and `edge-agent run` processes."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import ExitStack

from common.clock import rfc3339
from sync import protocol
from tests.availability.hubfeeds import publish
from tests.support.agentproc import AgentProcess
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

PREFIX = "retail"


def store_agent(tmp_path, broker, store_id: str, protocol_version: int = 5, **availability) -> AgentProcess:
    (tmp_path / store_id).mkdir(exist_ok=True)
    sections = {
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
                 "protocol": protocol_version},
        "sync": {"ack_timeout_s": 2.0},
        "service": {"backup_interval_s": 0},
    }
    if availability:
        sections["availability"] = availability
    return AgentProcess(tmp_path / store_id, store_id, sections=sections)


def record(agent: AgentProcess, *events: dict) -> None:
    status, answer = agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": list(events)})
    assert status == 201, answer


def availability(agent: AgentProcess, sku: str) -> dict:
    status, answer = agent.request("GET", f"/v1/availability/{sku}")
    assert status == 200, answer
    status, stock = agent.request("GET", f"/v1/stock/{sku}")
    if status == 200:  # `here` is always the local projection, field for field
        assert answer["here"] == {k: stock[k] for k in ("floor", "backroom", "reserved", "available")}
    return answer


def metric(agent: AgentProcess, name: str) -> float:
    status, text = agent.request("GET", "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))  # summed over labels


def warehouse(version: int, **items: int) -> bytes:
    return json.dumps({"v": 1, "warehouse_id": "wh-1", "version": version,
                       "items": [{"sku": s, "available": n} for s, n in items.items()]}).encode()


def snapshot(store_id: str, version: int, generated_at: str | None = None, **online: int) -> bytes:
    return json.dumps({"v": 1, "store_id": store_id, "version": version,
                       "generated_at": generated_at or rfc3339(time.time()),
                       "items": [{"sku": s, "nearby": [{"store_id": "store-x", "available": n}], "online": n}
                                 for s, n in online.items()]}).encode()


async def test_a_sale_in_store_a_reaches_store_b_kiosk_and_the_warehouse_feed_sets_online(tmp_path, broker):
    await publish(broker, protocol.warehouse_stock_topic(PREFIX, "wh-1"), warehouse(1, **{"SKU-1": 40}))
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,name\nSKU-1,Blue enamel mug\n")
    hub = HubProcess(tmp_path / "hub", broker, stores=("store-a", "store-b"),
                     extra=f'[availability]\npublish_interval_s = 0.2\n[catalog]\npath = "{catalog}"\n'
                     '[[sources]]\nid = "wh-1"\nkind = "warehouse"\n')
    with ExitStack() as stack:
        stack.enter_context(hub)
        a = stack.enter_context(store_agent(tmp_path, broker, "store-a"))
        # B speaks MQTT 3.1.1: no content types, so its snapshots must stay plain JSON.
        b = stack.enter_context(store_agent(tmp_path, broker, "store-b", protocol_version=4))
        record(a, {"type": "received", "sku": "SKU-1", "qty": 5, "location": "floor"})
        record(b, {"type": "received", "sku": "SKU-1", "qty": 2})

        def b_sees(available_at_a: int, online: int):
            answer = availability(b, "SKU-1")
            return answer if (answer["nearby"] == [{"store_id": "store-a", "available": available_at_a}]
                              and answer["online"] == online) else None

        first = wait_until(lambda: b_sees(5, 40), 30, "store B's kiosk to show store A's 5 and online 40")
        assert first["here"]["available"] == 2
        # The item's quantity joined at the store with the snapshot's sources table.
        [source] = first["sources"]
        assert list(source) == ["source_id", "name", "kind", "available", "lead_time_s", "updated_at", "stale",
                                "stale_after_s", "age_s"]
        assert (source["source_id"], source["name"], source["kind"], source["available"], source["lead_time_s"],
                source["stale"], source["stale_after_s"]) == ("wh-1", "wh-1", "warehouse", 40, 0, False, 3600)
        assert 0 <= source["age_s"] < 60
        assert first["snapshot"]["stale"] is False and first["snapshot"]["version"] >= 1

        record(a, {"type": "sold", "sku": "SKU-1", "qty": 5})
        second = wait_until(lambda: b_sees(0, 40), 30, "store B's kiosk to show store A sold out")
        assert second["snapshot"]["version"] > first["snapshot"]["version"]
        # A's own kiosk lists B as nearby, and `here` stays its local projection.
        assert availability(a, "SKU-1")["here"]["available"] == 0

        await publish(broker, protocol.warehouse_stock_topic(PREFIX, "wh-1"), warehouse(2, **{"SKU-1": 7}))
        wait_until(lambda: b_sees(0, 7), 30, "the warehouse feed to change online")
        assert wait_until(lambda: availability(a, "SKU-1")["nearby"] == [{"store_id": "store-b", "available": 2}],
                          30, "store A to see store B")
        sync = b.request("GET", "/v1/sync")[1]
        assert sync["snapshot_version"] == availability(b, "SKU-1")["snapshot"]["version"]
        # The catalog reached both kiosks (MQTT 5 and 3.1.1 alike) for name search.
        for agent in (a, b):
            wait_until(lambda: [(i["sku"], i["name"]) for i in agent.request(
                "GET", "/v1/search?q=enamel")[1]["items"]] == [("SKU-1", "Blue enamel mug")],
                20, "the catalog in the kiosk search")
        published = [line for line in hub.output().splitlines() if "published availability" in line]
        assert any("for store-a" in line and "zlib of" in line for line in published), published
        assert all("zlib" not in line for line in published if "for store-b" in line), published
        assert b.terminate() == 0 and a.terminate() == 0 and hub.terminate() == 0


async def test_snapshot_retained_while_agent_was_down_is_applied_on_reconnect(tmp_path, broker):
    agent = store_agent(tmp_path, broker, "store-a")
    with agent:
        # A first connect creates the persistent session; then the agent goes away.
        wait_until(lambda: agent.request("GET", "/v1/sync")[1]["connected"], 20, "the agent to connect")
        assert availability(agent, "SKU-9")["snapshot"] is None
        assert agent.terminate() == 0
        await publish(broker, protocol.availability_topic(PREFIX, "store-a"), snapshot("store-a", 7, **{"SKU-9": 3}))
        agent.start()
        answer = wait_until(lambda: (lambda a: a if a["snapshot"] else None)(availability(agent, "SKU-9")),
                            20, "the retained snapshot to be applied")
        assert answer["snapshot"]["version"] == 7
        assert answer["nearby"] == [{"store_id": "store-x", "available": 3}] and answer["online"] == 3
        assert answer["here"] == {"floor": 0, "backroom": 0, "reserved": 0, "available": 0}
        # It was stored durably: after a restart without the broker's help it is still there.
        assert agent.terminate() == 0
        broker.stop()
        agent.start()
        assert availability(agent, "SKU-9")["snapshot"]["version"] == 7


async def test_older_version_is_ignored_and_malformed_is_dropped_and_counted(tmp_path, broker):
    topic = protocol.availability_topic(PREFIX, "store-a")
    with store_agent(tmp_path, broker, "store-a") as agent:
        record(agent, {"type": "received", "sku": "SKU-1", "qty": 4})
        await publish(broker, topic, snapshot("store-a", 20, **{"SKU-1": 11}))
        wait_until(lambda: availability(agent, "SKU-1")["online"] == 11, 20, "snapshot 20")
        await publish(broker, topic, snapshot("store-a", 19, **{"SKU-1": 99}))
        wait_until(lambda: metric(agent, "edge_agent_snapshots_ignored_total") >= 1, 20, "the old one ignored")
        for bad in (b"{not json", snapshot("store-b", 30, **{"SKU-1": 1}),
                    json.dumps({"v": 1, "store_id": "store-a", "version": 31, "generated_at": rfc3339(time.time()),
                                "items": [{"sku": "SKU-1", "nearby": [], "online": -5}]}).encode()):
            await publish(broker, topic, bad)
        wait_until(lambda: metric(agent, "edge_agent_downlink_dropped_total") >= 3, 20, "three drops counted")
        answer = availability(agent, "SKU-1")
        assert answer["online"] == 11 and answer["snapshot"]["version"] == 20
        assert answer["here"]["available"] == 4
        # Still running and still applying newer snapshots.
        await publish(broker, topic, snapshot("store-a", 21, **{"SKU-1": 12}))
        wait_until(lambda: availability(agent, "SKU-1")["online"] == 12, 20, "snapshot 21")


async def test_stale_flips_when_the_snapshot_gets_older_than_max_age(tmp_path, broker):
    with store_agent(tmp_path, broker, "store-a", max_age_s=2) as agent:
        record(agent, {"type": "received", "sku": "SKU-1", "qty": 3, "location": "floor"})
        await publish(broker, protocol.availability_topic(PREFIX, "store-a"),
                      snapshot("store-a", 1, rfc3339(time.time() - 0.5), **{"SKU-1": 2}))
        fresh = wait_until(lambda: (lambda a: a if a["snapshot"] else None)(availability(agent, "SKU-1")),
                           20, "the snapshot")
        assert fresh["snapshot"]["stale"] is False and fresh["snapshot"]["age_s"] < 2
        stale = wait_until(lambda: (lambda a: a if a["snapshot"]["stale"] else None)(availability(agent, "SKU-1")),
                           10, "stale to flip")
        assert stale["snapshot"]["age_s"] > 2
        assert stale["here"]["available"] == 3 and stale["online"] == 2


def _children(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (read from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == pid and state != "Z":
            found.add(int(entry))
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


async def test_the_sync_process_that_applies_snapshots_does_not_outlive_the_agent(tmp_path, broker):
    agent = store_agent(tmp_path, broker, "store-a")
    with agent:
        wait_until(lambda: agent.request("GET", "/v1/sync")[1]["connected"], 20, "the agent to connect")
        for version, stop in ((1, "kill"), (2, "terminate")):
            await publish(broker, protocol.availability_topic(PREFIX, "store-a"),
                          snapshot("store-a", version, **{"SKU-9": 3}))
            wait_until(lambda: (availability(agent, "SKU-9")["snapshot"] or {}).get("version") == version,
                       20, f"snapshot {version} to be applied by the sync process")
            workers = _children(agent.proc.pid)
            assert workers, "the sync process should be a child of the agent"
            if stop == "kill":
                agent.kill()
            else:
                assert agent.terminate() == 0
            wait_until(lambda: not _alive(workers), 10, f"the sync process to exit after the agent's {stop}")
            agent.start()
