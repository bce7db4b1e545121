"""The demo's feeds: what they publish matches the hub's documented payloads and its config."""

from __future__ import annotations

import json

from demo.catalog import products
from demo.feed import CAP, QUIET, SOURCES, Feeds, capped_sku, sending
from sync import protocol


def test_every_source_lists_the_capped_sku_and_the_payloads_have_the_documented_shape():
    skus = [sku for sku, _ in products(60)]
    feeds = Feeds(skus, port=1)
    assert feeds.capped == capped_sku(skus) == "SKU-00021"
    for source in SOURCES:
        payload = json.loads(feeds._payload(source))
        topic = feeds._topic(source)
        if source["kind"] == "warehouse":
            assert topic == protocol.warehouse_stock_topic("retail", source["id"])
            assert payload["warehouse_id"] == source["id"]
        else:
            assert topic == f"retail/sources/{source['id']}/stock"
            assert set(payload) == {"v", "source_id", "version", "items"}
            assert payload["source_id"] == source["id"]
        assert payload["v"] == 1 and payload["version"] == 1
        listed = {item["sku"]: item["available"] for item in payload["items"]}
        assert listed[feeds.capped] > 0 and all(n >= 0 for n in listed.values())
        assert set(listed) <= set(skus)
        assert json.loads(feeds._payload(source))["version"] == 2   # each round a newer version
    # Two partner/supplier sources besides the warehouse, each as the hub's [[sources]] takes it.
    assert sorted(s["kind"] for s in SOURCES) == ["partner", "supplier", "warehouse"]
    assert all(set(s) == {"id", "name", "kind", "lead_time_s", "stale_after_s"} for s in SOURCES)
    assert CAP["limit"] > 0 and CAP["period"] in ("day", "week", "month") and CAP["scope"] == "store"


def test_the_quiet_supplier_goes_quiet_long_enough_to_turn_stale_and_comes_back():
    (source_id, (on, off)), = QUIET.items()
    stale_after = next(s["stale_after_s"] for s in SOURCES if s["id"] == source_id)
    assert off > stale_after + 10    # each quiet spell shows it stale on the kiosk for a while
    assert sending(0, (on, off)) and sending(on - 1, (on, off))
    assert not sending(on, (on, off)) and not sending(on + off - 1, (on, off))
    assert sending(on + off, (on, off))
    assert sending(10**6, None)
