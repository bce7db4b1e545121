"""Open orders and backorders on a real `edge-hub run` and mosquitto; the hub.db migration."""

from __future__ import annotations

import sqlite3

from sync import protocol
from tests.availability.hubfeeds import PREFIX, Snapshots, feed_hub, items, publish, source_toml, stock, wait_rejected

SOURCES = (source_toml("wh-1", "warehouse"), source_toml("wh-2", "warehouse"), source_toml("sup-x", "supplier"))


def orders(*rows: tuple[str, str, int, str]) -> dict:
    return {"v": 1, "orders": [{"order_id": o, "sku": sku, "qty": q, "state": st} for o, sku, q, st in rows]}


def figures(snapshot: dict, sku: str) -> tuple:
    item = items(snapshot)[sku]
    return item["online"], {s["source_id"]: s["available"] for s in item["sources"]}


async def test_a_duplicated_legacy_order_counts_once_and_both_stores_are_net_of_it(tmp_path, broker):
    with feed_hub(tmp_path, broker, *SOURCES) as hub:
        async with Snapshots(broker) as snaps:
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-1"), stock("wh-1", 1, SKU_1=4))
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-2"), stock("wh-2", 1, SKU_1=6))
            await publish(broker, protocol.source_stock_topic(PREFIX, "sup-x"), stock("sup-x", 1, SKU_1=40))
            await snaps.wait("store-a", lambda i: i.get("SKU-1", {}).get("online") == 10)
            topic = protocol.orders_topic(PREFIX, "online")
            # A legacy feed sends the same open order twice, and once more inside one message.
            for _ in range(2):
                await publish(broker, topic, orders(("o-1", "SKU-1", 5, "open")), retain=False)
            await publish(broker, topic, orders(("o-1", "SKU-1", 5, "open"), ("o-2", "SKU-1", 1, "open"),
                                                ("o-2", "SKU-1", 1, "open")), retain=False)
            await publish(broker, protocol.orders_topic(PREFIX, "sup-x"),
                          orders(("p-1", "SKU-1", 15, "open")), retain=False)
            for store_id in ("store-a", "store-b"):  # every store sees the same claims: no unit promised twice
                snap = await snaps.wait(store_id, lambda i: i["SKU-1"]["online"] == 4, what="online net of o-1, o-2")
                # 6 claimed online come out of the fresh warehouses in config order: wh-1 first.
                assert figures(snap, "SKU-1") == (4, {"wh-1": 0, "wh-2": 4, "sup-x": 25})
            # Fulfilled (or cancelled) releases the claim; a late resend of "open" does not reopen it.
            await publish(broker, topic, orders(("o-1", "SKU-1", 5, "fulfilled")), retain=False)
            await publish(broker, topic, orders(("o-1", "SKU-1", 5, "open")), retain=False)
            await publish(broker, protocol.orders_topic(PREFIX, "sup-x"),
                          orders(("p-1", "SKU-1", 15, "cancelled")), retain=False)
            await publish(broker, topic, orders(("o-3", "SKU-1", 2, "open")), retain=False)  # a marker: after the resend
            snap = await snaps.wait("store-b", lambda i: i["SKU-1"]["online"] == 7, what="o-1 released, o-3 claimed")
            assert figures(snap, "SKU-1") == (7, {"wh-1": 1, "wh-2": 6, "sup-x": 40})
            # A backorder larger than the stock: figures stop at 0.
            await publish(broker, topic, orders(("o-4", "SKU-1", 50, "open")), retain=False)
            snap = await snaps.wait("store-a", lambda i: i["SKU-1"]["online"] == 0)
            assert figures(snap, "SKU-1") == (0, {"wh-1": 0, "wh-2": 0, "sup-x": 40})
        with sqlite3.connect(hub.db_path) as conn:
            held = conn.execute("SELECT source_id, order_id, state FROM orders ORDER BY 1, 2").fetchall()
        assert held == [("online", "o-1", "fulfilled"), ("online", "o-2", "open"), ("online", "o-3", "open"),
                        ("online", "o-4", "open"), ("sup-x", "p-1", "cancelled")]


async def test_orders_for_an_unconfigured_source_or_malformed_are_refused_and_counted(tmp_path, broker):
    with feed_hub(tmp_path, broker, *SOURCES) as hub:
        async with Snapshots(broker) as snaps:
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-1"), stock("wh-1", 1, SKU_1=4))
            await publish(broker, protocol.orders_topic(PREFIX, "nobody"),
                          orders(("o-1", "SKU-1", 1, "open")), retain=False)
            # One bad order refuses the whole message: its good order is not applied either.
            await publish(broker, protocol.orders_topic(PREFIX, "online"),
                          orders(("o-2", "SKU-1", 1, "open"), ("o-3", "SKU-1", 0, "open")), retain=False)
            await publish(broker, protocol.orders_topic(PREFIX, "online"),
                          orders(("o-4", "SKU-1", 1, "shipped")), retain=False)
            await publish(broker, protocol.orders_topic(PREFIX, "online"), b"[1, 2", retain=False)
            await wait_rejected(hub, "orders_unconfigured", 1)
            await wait_rejected(hub, "orders_invalid", 2)
            await wait_rejected(hub, "orders_undecodable", 1)
            assert "(orders_invalid): orders[1].qty: 0 is not an integer from 1" in hub.output()
            snap = await snaps.wait("store-a", lambda i: "SKU-1" in i)
            assert figures(snap, "SKU-1") == (4, {"wh-1": 4})
            assert hub.running


async def test_a_hub_database_from_before_sources_is_migrated(tmp_path, broker):
    hub = feed_hub(tmp_path, broker, *SOURCES)
    with sqlite3.connect(hub.db_path) as conn:  # the tables as the hub wrote them before [[sources]]
        conn.execute("CREATE TABLE warehouse_stock (warehouse_id TEXT NOT NULL, sku TEXT NOT NULL,"
                     " available INTEGER NOT NULL, PRIMARY KEY (warehouse_id, sku)) WITHOUT ROWID")
        conn.execute("CREATE TABLE warehouse_feeds (warehouse_id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
                     " items INTEGER NOT NULL) WITHOUT ROWID")
        conn.executemany("INSERT INTO warehouse_stock VALUES (?,?,?)", [("wh-1", "SKU-1", 9), ("wh-old", "SKU-2", 3)])
        conn.executemany("INSERT INTO warehouse_feeds VALUES (?,?,?)", [("wh-1", 5, 1), ("wh-old", 2, 1)])
    with hub:
        async with Snapshots(broker) as snaps:
            snap = await snaps.wait("store-a", lambda i: "SKU-1" in i)
            item = items(snap)["SKU-1"]
            # Moved over, but when it was accepted is unknown: shown stale, not counted online.
            assert [(s["source_id"], s["available"], s["stale"]) for s in item["sources"]] == [("wh-1", 9, True)]
            assert item["online"] is None
            assert "SKU-2" not in items(snap)  # wh-old is not configured
            # The held version still orders feeds: an older one is not newer, a newer one applies.
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-1"), stock("wh-1", 5, SKU_1=1))
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-1"), stock("wh-1", 6, SKU_1=8))
            snap = await snaps.wait("store-a", lambda i: i["SKU-1"]["online"] == 8)
        assert hub.terminate() == 0
    with sqlite3.connect(hub.db_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"source_stock", "source_feeds", "orders", "caps", "cap_grants"} <= tables
    assert not {"warehouse_stock", "warehouse_feeds"} & tables
