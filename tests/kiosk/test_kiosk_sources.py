"""The cap and the sources on the kiosk, over the real path: feeds -> hub -> snapshot -> agent -> page.

The feeds are published as a warehouse's, a partner's and a supplier's systems would:
retained on the hub's topics, with the cap on `P/caps/{sku}`. The page must show what the
agent answers: the cap with what is left now, each source with its lead time and age,
and a source that stopped sending marked stale, then fresh again once it sends.
"""

from __future__ import annotations

import json
import re
import threading
import uuid

import paho.mqtt.client as paho
from playwright.sync_api import expect

from sync import protocol
from tests.kiosk.conftest import SOURCES, post
from tests.sync.helpers import wait_until

PREFIX = "retail"
SKU = "SKU-KET-17"


def publish(broker, topic: str, payload: dict) -> None:
    """Publish `payload` as JSON, retained, QoS 1, and wait for the broker's PUBACK."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-feed-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, json.dumps(payload).encode(), qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


def source_stock(source_id: str, version: int, **items: int) -> dict:
    return {"v": 1, "source_id": source_id, "version": version,
            "items": [{"sku": sku.replace("_", "-"), "available": n} for sku, n in items.items()]}


def answer(stack) -> dict:
    status, body = stack.a.request("GET", f"/v1/availability/{SKU}")
    assert status == 200, body
    return body


def row(page, source_id: str):
    return page.locator(f'#sources li[data-source-id="{source_id}"]')


def open_product(page, url: str) -> None:
    page.goto(url + "/")
    page.get_by_label("Find a product by name or SKU").fill(SKU)
    page.keyboard.press("Enter")
    expect(page.locator("#detail-sku")).to_have_text(SKU)


def test_the_cap_and_each_source_show_what_the_agent_answers(stack, page):
    publish(stack.broker, protocol.warehouse_stock_topic(PREFIX, "wh-1"),
            {"v": 1, "warehouse_id": "wh-1", "version": 1, "items": [{"sku": SKU, "available": 30}]})
    publish(stack.broker, f"{PREFIX}/sources/partner-north/stock", source_stock("partner-north", 1, SKU_KET_17=25))
    publish(stack.broker, f"{PREFIX}/caps/{SKU}", {"v": 1, "sku": SKU, "limit": 5, "scope": "store", "period": "week"})
    got = wait_until(lambda: (a := answer(stack))["cap"] and {s["source_id"] for s in a["sources"]} >= {
        "wh-1", "partner-north"} and a, timeout=30, what="the cap and the two sources at store-a")
    # The fixture's reservation of 2 counts against the cap (made in this period).
    assert got["cap"]["limit"] == 5 and got["cap"]["left"] == 3, got["cap"]

    open_product(page, stack.a.url)
    cap = page.locator("#cap")
    expect(cap).to_be_visible()
    expect(cap).to_have_text(re.compile(r"^Limit 5 per week, 3 left · resets \w{3} \d+ \w{3} \d\d:\d\d$"))
    expect(row(page, "wh-1")).to_have_text(re.compile(
        r"^Central warehouse: 30, delivery in 1 day, updated (just now|\d+ min ago)"))
    expect(row(page, "partner-north")).to_have_text(re.compile(
        r"^Partner North: 25, delivery in 2 days, updated (just now|\d+ min ago)"))
    expect(row(page, "partner-north")).to_have_attribute("data-stale", "false")
    expect(row(page, "partner-north").locator(".badge")).to_be_hidden()
    # Warehouses first, then partners; the warehouse's figure is also the online one.
    assert page.locator("#sources li").evaluate_all("rows => rows.map(r => r.dataset.sourceId)")[:2] == [
        "wh-1", "partner-north"]
    expect(page.locator("#online")).to_have_text("30 available online")

    # A sale here moves "left" on the open page (the stream), and using it up says so.
    post(stack.a, {"type": "sold", "sku": SKU, "qty": 1, "location": "floor"})
    expect(cap).to_have_text(re.compile(r"^Limit 5 per week, 2 left"), timeout=4_000)
    post(stack.a, {"type": "reserved", "sku": SKU, "qty": 2, "reservation_id": "R-cap"})
    expect(cap).to_have_text(re.compile(r"^Limit 5 per week, none left"), timeout=4_000)
    expect(cap).to_have_attribute("data-left", "0")
    assert answer(stack)["cap"]["left"] == 0


def test_a_source_that_stops_sending_is_marked_stale_then_fresh_when_it_resumes(stack, page):
    stale_after = next(s["stale_after_s"] for s in SOURCES if s["id"] == "supplier-x")
    publish(stack.broker, f"{PREFIX}/sources/supplier-x/stock", source_stock("supplier-x", 1, SKU_KET_17=40))
    wait_until(lambda: any(s["source_id"] == "supplier-x" for s in answer(stack)["sources"]), timeout=30,
               what="supplier-x in store-a's answer")
    open_product(page, stack.a.url)
    supplier = row(page, "supplier-x")
    expect(supplier).to_contain_text("Supplier X: 40, delivery in 3 days")
    # It sends nothing more: past its stale_after_s the page marks it, the others stay fresh.
    expect(supplier).to_have_attribute("data-stale", "true", timeout=(stale_after + 20) * 1000)
    expect(supplier).to_have_text(re.compile(r"^Supplier X: 40, delivery in 3 days, not updated for \d+ (s|min) stale$"))
    expect(supplier.locator(".badge")).to_be_visible()
    expect(row(page, "partner-north")).to_have_attribute("data-stale", "false")
    assert next(s for s in answer(stack)["sources"] if s["source_id"] == "supplier-x")["stale"] is True

    # It resumes (a version a second, as a live feed would): fresh again, its new figure.
    stop = threading.Event()

    def resume() -> None:
        version = 2
        while not stop.is_set():
            publish(stack.broker, f"{PREFIX}/sources/supplier-x/stock", source_stock("supplier-x", version, SKU_KET_17=38))
            version += 1
            stop.wait(1.0)

    feeder = threading.Thread(target=resume, name="supplier-x", daemon=True)
    feeder.start()
    try:
        expect(supplier).to_have_attribute("data-stale", "false", timeout=30_000)
        expect(supplier).to_have_text(re.compile(r"^Supplier X: 38, delivery in 3 days, updated just now"))
        expect(supplier.locator(".badge")).to_be_hidden()
    finally:
        stop.set()
        feeder.join(10)
