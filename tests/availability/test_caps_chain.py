"""A chain-wide cap split over three real stores, one of them offline: real hub, agents, mosquitto."""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack

from tests.availability.hubfeeds import cli, feed_hub
from tests.availability.test_processes import store_agent
from tests.support.net import free_port
from tests.sync.helpers import wait_until

STORES = ("store-a", "store-b", "store-c")
LIMIT = 12   # step = half the equal share of 4: each store starts with 2, 6 stay in the pool
SKU = "CONSOLE"


def post(agent, *events: dict) -> int:
    status, body = agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": list(events)})
    assert status in (201, 409), body
    if status == 409:
        assert body["error"]["code"] == "sales_cap_reached", body
    return status


def cap(agent) -> dict | None:
    status, answer = agent.request("GET", f"/v1/availability/{SKU}")
    assert status == 200, answer
    return answer["cap"]


def sold_at_hub(hub) -> dict[str, int]:
    return {s: sum(e["qty"] for e in hub.export(s) if e["type"] == "sold" and e["sku"] == SKU) for s in STORES}


async def test_a_chain_cap_is_never_passed_while_a_store_sells_offline_on_its_last_allowance(tmp_path, broker):
    hub = feed_hub(tmp_path, broker, stores=STORES)
    with ExitStack() as stack:
        stack.enter_context(hub)
        agents = {s: stack.enter_context(store_agent(tmp_path, broker, s)) for s in STORES}
        for agent in agents.values():
            assert post(agent, {"type": "received", "sku": SKU, "qty": 100, "location": "floor"}) == 201
        done = cli(hub, "caps", "set", SKU, "--limit", str(LIMIT), "--period", "week", "--scope", "chain")
        assert done.returncode == 0, done.stderr
        for agent in agents.values():
            got = wait_until(lambda: (cap(agent) or {}).get("allowance") == 2 and cap(agent), 30, "the first allowance")
            assert got["scope"] == "chain" and got["limit"] == LIMIT and got["left"] == 2

        # Store C loses its link (restarted against a port nobody listens on): it keeps its last allowance.
        c = agents["store-c"]
        c.terminate()
        c.sections["mqtt"]["port"] = free_port()
        c.start()
        wait_until(lambda: not c.request("GET", "/v1/sync")[1]["connected"], 20, "store C to be offline")

        # A and B sell one at a time; the hub grows their allowances out of the pool as their sales arrive.
        sold = {"store-a": 0, "store-b": 0}
        deadline = time.monotonic() + 90
        while sum(sold.values()) < LIMIT - 2 and time.monotonic() < deadline:
            for s in sold:
                if post(agents[s], {"type": "sold", "sku": SKU, "qty": 1}) == 201:
                    sold[s] += 1
            time.sleep(0.05)
        assert sum(sold.values()) == LIMIT - 2, sold   # everything but C's 2
        assert min(sold.values()) >= 2                  # neither was starved of its first step
        # The pool is empty: for several publish intervals nothing more passes at A or B.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for s in sold:
                assert post(agents[s], {"type": "sold", "sku": SKU, "qty": 1}) == 409
            time.sleep(0.2)
        for s in sold:
            assert cap(agents[s])["left"] == 0

        # C, offline all along, sells what it was promised, and no more.
        assert post(c, {"type": "sold", "sku": SKU, "qty": 2}) == 201
        assert post(c, {"type": "sold", "sku": SKU, "qty": 1}) == 409
        assert cap(c)["used"] == 2 and cap(c)["left"] == 0

        # C comes back: its sales reach the hub, the chain total is exactly the limit, and no store
        # is given more (C's use now counts where its promise did).
        c.terminate()
        c.sections["mqtt"]["port"] = broker.port
        c.start()
        wait_until(lambda: sold_at_hub(hub)["store-c"] == 2, 30, "store C's sales at the hub")
        time.sleep(1.0)   # five publish intervals with C's sales known
        for agent in agents.values():
            assert post(agent, {"type": "sold", "sku": SKU, "qty": 1}) == 409
        assert sum(sold_at_hub(hub).values()) == LIMIT
        listed = [line for line in cli(hub, "caps", "list").stdout.splitlines() if SKU in line]
        assert listed and f'"limit": {LIMIT}' in listed[0]
        for agent in agents.values():
            assert agent.terminate() == 0
        assert hub.terminate() == 0


def status_of(broker, store_id: str) -> dict:
    """The store's retained status, as the hub reads it (a plain paho client)."""
    import json
    import queue

    import paho.mqtt.client as paho

    got: queue.Queue = queue.Queue()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-status-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"retail/stores/{store_id}/status", qos=1)
    client.on_message = lambda c, u, message: got.put(message.payload)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        return json.loads(got.get(timeout=10))
    finally:
        client.loop_stop()
        client.disconnect()


async def test_allowance_a_store_no_longer_needs_goes_back_to_the_pool_once_its_status_confirms(tmp_path, broker):
    stores = ("store-a", "store-b")
    limit = 8   # step = half the equal share of 4: each store starts with 2, 4 stay in the pool
    hub = feed_hub(tmp_path, broker, stores=stores)
    with ExitStack() as stack:
        stack.enter_context(hub)
        agents = {}
        for s in stores:
            agent = store_agent(tmp_path, broker, s)
            agent.sections["service"]["heartbeat_interval_s"] = 1
            agents[s] = stack.enter_context(agent)
        a, b = agents["store-a"], agents["store-b"]
        for agent in agents.values():
            assert post(agent, {"type": "received", "sku": SKU, "qty": 100, "location": "floor"}) == 201
        done = cli(hub, "caps", "set", SKU, "--limit", str(limit), "--period", "week", "--scope", "chain")
        assert done.returncode == 0, done.stderr
        for agent in agents.values():
            wait_until(lambda: (cap(agent) or {}).get("allowance") == 2, 30, "the first allowance")

        # B holds 2 for a customer: its target grows, and the hub tops it up from the pool.
        assert post(b, {"type": "reserved", "sku": SKU, "qty": 2, "reservation_id": "hold-1"}) == 201
        wait_until(lambda: cap(b)["allowance"] == 4, 30, "B topped up to its target")
        # The customer leaves: B's use falls to 0, so it is sent its target of 2 again ...
        assert post(b, {"type": "reservation_released", "reservation_id": "hold-1"}) == 201
        wait_until(lambda: cap(b)["allowance"] == 2, 30, "B's allowance lowered")
        # ... and its status reports the snapshot that lowered it, with the log's position.
        version = b.request("GET", "/v1/sync")[1]["snapshot_version"]
        reported = wait_until(lambda: (lambda st: st.get("snapshot_version", 0) >= version and st)(status_of(broker, "store-b")),
                              30, "B's status to carry the snapshot it holds")
        assert reported["last_seq"] == b.request("GET", "/v1/sync")[1]["last_seq"]

        # A sells one at a time: the pool (2 left) and then the 2 B gave back reach it.
        sold = 0
        deadline = time.monotonic() + 60
        while sold < limit - 2 and time.monotonic() < deadline:
            if post(a, {"type": "sold", "sku": SKU, "qty": 1}) == 201:
                sold += 1
            time.sleep(0.05)
        assert sold == limit - 2, f"A sold {sold}: B's unused allowance did not come back"
        # B still has its own 2, and the chain never passes the limit.
        assert post(b, {"type": "sold", "sku": SKU, "qty": 2}) == 201
        assert post(a, {"type": "sold", "sku": SKU, "qty": 1}) == 409
        assert post(b, {"type": "sold", "sku": SKU, "qty": 1}) == 409
        wait_until(lambda: sum(sum(e["qty"] for e in hub.export(s) if e["type"] == "sold" and e["sku"] == SKU)
                               for s in stores) == limit, 30, "every sale at the hub")
        for agent in agents.values():
            assert agent.terminate() == 0
        assert hub.terminate() == 0
