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
