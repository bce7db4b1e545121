"""Partner and supplier feeds on a real `edge-hub run` and a real mosquitto."""

from __future__ import annotations

import asyncio
import time

from sync import protocol
from tests.availability.hubfeeds import (PREFIX, Snapshots, feed_hub, items, publish, source_toml, stock,
                                        wait_rejected, wire_items)

SUPPLIER = source_toml("sup-x", "supplier", "Supplier X", lead_time_s=259200)
WAREHOUSE = source_toml("wh-1", "warehouse", "Central warehouse", lead_time_s=86400)


async def test_each_configured_source_is_listed_and_online_sums_the_warehouses(tmp_path, broker):
    with feed_hub(tmp_path, broker, SUPPLIER, WAREHOUSE, source_toml("wh-2", "warehouse")):
        async with Snapshots(broker) as snaps:
            await publish(broker, protocol.source_stock_topic(PREFIX, "sup-x"), stock("sup-x", 1, SKU_1=40))
            # The contract's warehouse topic, for a configured warehouse source.
            await publish(broker, protocol.warehouse_stock_topic(PREFIX, "wh-1"), {
                "v": 1, "warehouse_id": "wh-1", "version": 3, "items": [{"sku": "SKU-1", "available": 7}]})
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-2"), stock("wh-2", 1, SKU_1=5, SKU_2=1))
            snap = await snaps.wait("store-b", lambda i: len(i.get("SKU-1", {}).get("sources", [])) == 3)
            item = items(snap)["SKU-1"]
            assert item["online"] == 12
            rows = {s["source_id"]: s for s in item["sources"]}
            assert [s["source_id"] for s in item["sources"]] == ["sup-x", "wh-1", "wh-2"]  # config order
            assert rows["sup-x"] | {"updated_at": None} == {
                "source_id": "sup-x", "name": "Supplier X", "kind": "supplier", "available": 40,
                "lead_time_s": 259200, "stale_after_s": 3600, "updated_at": None, "stale": False}
            assert abs(protocol_time(rows["sup-x"]["updated_at"]) - time.time()) < 60
            assert items(snap)["SKU-2"]["online"] == 1
            assert items(snaps.latest("store-a"))["SKU-1"]["sources"] == item["sources"]
            # On the wire: the sources' metadata once, in a table beside the items; an item
            # carries only each source's quantity.
            assert wire_items(snap)["SKU-1"]["sources"] == {"sup-x": 40, "wh-1": 7, "wh-2": 5}
            assert wire_items(snap)["SKU-2"]["sources"] == {"wh-2": 1}
            assert [t["source_id"] for t in snap["sources"]] == ["sup-x", "wh-1", "wh-2"]
            assert set(snap["sources"][0]) == {"source_id", "name", "kind", "lead_time_s", "updated_at",
                                               "stale", "stale_after_s"}


async def test_a_new_list_with_the_same_figures_does_not_republish(tmp_path, broker):
    # Only the source's updated_at moves: the snapshot's digest leaves it out, so no store
    # is sent a snapshot for it (the next due publish carries the new time).
    with feed_hub(tmp_path, broker, SUPPLIER):
        async with Snapshots(broker) as snaps:
            topic = protocol.source_stock_topic(PREFIX, "sup-x")
            await publish(broker, topic, stock("sup-x", 1, SKU_1=40))
            first = await snaps.wait("store-a", lambda i: "SKU-1" in i)
            await asyncio.sleep(0.3)  # the same list again, at a later time (updated_at in ms)
            await publish(broker, topic, stock("sup-x", 2, SKU_1=40))
            await asyncio.sleep(2.0)  # ten publish runs
            assert snaps.latest("store-a")["version"] == first["version"]
            await publish(broker, topic, stock("sup-x", 3, SKU_1=41))
            changed = await snaps.wait("store-a", lambda i: i["SKU-1"]["sources"][0]["available"] == 41)
            assert changed["sources"][0]["updated_at"] > first["sources"][0]["updated_at"]


def protocol_time(text: str) -> float:
    from common.clock import parse_rfc3339
    return parse_rfc3339(text)


async def test_an_invalid_feed_message_is_refused_counted_and_the_held_list_stays(tmp_path, broker):
    with feed_hub(tmp_path, broker, SUPPLIER) as hub:
        async with Snapshots(broker) as snaps:
            topic = protocol.source_stock_topic(PREFIX, "sup-x")
            await publish(broker, topic, stock("sup-x", 1, SKU_1=40))
            await snaps.wait("store-a", lambda i: "SKU-1" in i)
            for bad in (stock("sup-x", 2, SKU_1=-3),                  # negative available
                        stock("other", 3, SKU_1=1),                   # source_id differs from the topic
                        {"v": 1, "source_id": "sup-x", "version": 4,  # a SKU listed twice
                         "items": [{"sku": "SKU-1", "available": 1}, {"sku": "SKU-1", "available": 2}]}):
                await publish(broker, topic, bad)
            await publish(broker, topic, b"{not json")
            await publish(broker, topic, {"v": 1, "source_id": "sup-x", "version": "5", "items": []})
            stats = await wait_rejected(hub, "source_invalid", 3)
            assert stats["rejected"]["source_undecodable"] == 2
            assert items(snaps.latest("store-a"))["SKU-1"]["sources"][0]["available"] == 40
            out = hub.output()
            # Logged naming the field (one line per reason a minute: the rest are counted).
            assert "(source_invalid): items[0].available: -3 is negative" in out
            assert "(source_undecodable): SourceStock: JSON is malformed" in out
            # Still running, and a good feed still applies.
            await publish(broker, topic, stock("sup-x", 6, SKU_1=39))
            await snaps.wait("store-a", lambda i: i.get("SKU-1", {}).get("sources", [{}])[0].get("available") == 39)
            assert hub.running


async def test_an_unconfigured_source_is_refused_and_counted(tmp_path, broker):
    with feed_hub(tmp_path, broker, SUPPLIER) as hub:
        async with Snapshots(broker) as snaps:
            await publish(broker, protocol.source_stock_topic(PREFIX, "nobody"), stock("nobody", 1, SKU_9=5))
            # The warehouse topic takes a configured warehouse only: not an unknown id, nor a supplier.
            await publish(broker, protocol.warehouse_stock_topic(PREFIX, "wh-9"), {
                "v": 1, "warehouse_id": "wh-9", "version": 1, "items": [{"sku": "SKU-9", "available": 5}]})
            await publish(broker, protocol.warehouse_stock_topic(PREFIX, "sup-x"), {
                "v": 1, "warehouse_id": "sup-x", "version": 1, "items": [{"sku": "SKU-9", "available": 5}]})
            await wait_rejected(hub, "source_unconfigured", 3)
            await publish(broker, protocol.source_stock_topic(PREFIX, "sup-x"), stock("sup-x", 1, SKU_1=2))
            snap = await snaps.wait("store-a", lambda i: "SKU-1" in i)
            assert "SKU-9" not in items(snap)
            assert "source 'nobody' is not in the hub's [[sources]]" in hub.output()


async def test_a_source_that_stops_sending_is_marked_stale_after_its_own_interval(tmp_path, broker):
    quick = source_toml("wh-quick", "warehouse", stale_after_s=3)
    slow = source_toml("wh-slow", "warehouse", stale_after_s=3600)
    with feed_hub(tmp_path, broker, quick, slow):
        async with Snapshots(broker) as snaps:
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-quick"), stock("wh-quick", 1, SKU_1=4, SKU_2=6))
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-slow"), stock("wh-slow", 1, SKU_1=10))
            fresh = await snaps.wait("store-a", lambda i: i.get("SKU-1", {}).get("online") == 14)
            sent_at = time.monotonic()
            assert [s["stale"] for s in items(fresh)["SKU-1"]["sources"]] == [False, False]
            # No feed message, no stock change, refresh_s 1 h: the stale flip alone republishes.
            stale = await snaps.wait("store-a", lambda i: i["SKU-1"]["sources"][0]["stale"], 30, "a stale wh-quick")
            assert time.monotonic() - sent_at >= 2.5  # not before its own 3 s (the clock started before)
            assert stale["version"] > fresh["version"]
            sku1, sku2 = items(stale)["SKU-1"], items(stale)["SKU-2"]
            assert [(s["source_id"], s["stale"], s["available"]) for s in sku1["sources"]] == [
                ("wh-quick", True, 4), ("wh-slow", False, 10)]
            assert sku1["online"] == 10           # the stale warehouse is shown, not counted
            assert sku2["online"] is None         # only a stale warehouse lists it: unknown, not 0
            # It sends again: fresh again, counted again.
            await publish(broker, protocol.source_stock_topic(PREFIX, "wh-quick"), stock("wh-quick", 2, SKU_1=4))
            await snaps.wait("store-a", lambda i: i["SKU-1"]["online"] == 14 and not i["SKU-1"]["sources"][0]["stale"])
            await asyncio.sleep(0)


def test_source_and_zone_config_mistakes_name_the_key(tmp_path):
    import pytest

    from common.config import ConfigError
    from sync.hub.settings import load_hub_config, zones

    path = tmp_path / "hub.toml"
    store = '[[stores]]\nid = "store-a"\n'
    for body, match in ((store + '[[sources]]\nid = "s1"\n', "kind"),
                        (store + '[[sources]]\nid = "s1"\nkind = "shop"\n', "kind"),
                        (store + '[[sources]]\nid = "s1"\nkind = "partner"\nstale_after_s = 1.5\n', "stale_after_s"),
                        (store + '[[sources]]\nid = "s1"\nkind = "partner"\n' * 2, "source id 's1' is listed twice"),
                        (store + '[[sources]]\nid = "online"\nkind = "warehouse"\n', "'online' is reserved"),
                        ('[[stores]]\nid = "store-a"\ntimezone = "Mars/Olympus"\n', "timezone 'Mars/Olympus'")):
        path.write_text(body)
        with pytest.raises(ConfigError, match=match):
            load_hub_config(path, environ={})
    path.write_text('[[stores]]\nid = "store-a"\ntimezone = "Europe/Paris"\n[[stores]]\nid = "store-b"\n'
                    '[[sources]]\nid = "s1"\nkind = "partner"\n')
    config = load_hub_config(path, environ={})
    assert {k: str(v) for k, v in zones(config).items()} == {"store-a": "Europe/Paris", "store-b": "UTC"}
    assert config.sources[0].display_name == "s1" and config.sources[0].stale_after_s == 3600
