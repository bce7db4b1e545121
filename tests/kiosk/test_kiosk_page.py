"""The kiosk page in a real browser, against real agents, a real hub and a real broker."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.kiosk.conftest import post
from tests.sync.helpers import wait_until


def show(page, url: str, query: str, pick: str | None = None) -> None:
    page.goto(url + "/")
    page.get_by_label("Find a product by name or SKU").fill(query)
    page.keyboard.press("Enter")
    if pick is not None:
        page.locator("button.result", has_text=pick).click()


def expect_figures(page, answer: dict) -> None:
    """The page shows exactly what GET /v1/availability answered."""
    for field in ("available", "floor", "backroom", "reserved"):
        expect(page.locator(f"#here-{field}")).to_have_text(str(answer["here"][field]))
    for store in answer["nearby"]:
        expect(page.locator(f'#nearby li[data-store-id="{store["store_id"]}"] strong')).to_have_text(
            str(store["available"]))
    online = answer["online"]
    expect(page.locator("#online")).to_have_text(
        "Not known" if online is None else f"{online} available online" if online > 0 else "Out of stock online")


def test_search_by_name_shows_the_figures_the_api_returns(stack, page):
    show(page, stack.a.url, "kettle")
    results = page.locator("button.result")
    expect(results).to_have_count(2)
    expect(page.locator("#results-summary")).to_have_text(re.compile("2 products match"))
    page.locator("button.result", has_text="Electric kettle 1.7 l").click()
    expect(page.locator("#detail-title")).to_have_text("Electric kettle 1.7 l")
    expect(page.locator("#detail-title")).to_be_focused()
    status, answer = stack.a.request("GET", "/v1/availability/SKU-KET-17")
    assert status == 200 and answer["here"] == {"floor": 4, "backroom": 10, "reserved": 2, "available": 12}
    expect_figures(page, answer)
    expect(page.locator('#nearby li[data-store-id="store-b"] strong')).to_have_text("7")
    expect(page.locator("#snapshot")).to_have_attribute("data-state", "fresh")


def test_search_by_sku_opens_the_product(stack, page):
    show(page, stack.a.url, "SKU-TST-2")
    expect(page.locator("#detail-sku")).to_have_text("SKU-TST-2")
    expect(page.locator("#detail-title")).to_have_text("Toaster 2-slice")
    _, answer = stack.a.request("GET", "/v1/availability/SKU-TST-2")
    expect_figures(page, answer)
    expect(page.locator("#here-available")).to_have_text("3")


def test_a_url_with_q_opens_the_page_on_that_search(stack, page):
    page.goto(stack.a.url + "/?q=SKU-TST-2")
    expect(page.locator("#search-input")).to_have_value("SKU-TST-2")
    expect(page.locator("#detail-title")).to_have_text("Toaster 2-slice")
    # Any other parameter is still refused, naming it.
    assert page.goto(stack.a.url + "/?x=1").status == 400


def test_keyboard_only_search_and_pick(stack, page):
    page.goto(stack.a.url + "/")
    expect(page.locator("#search-input")).to_be_focused()
    page.keyboard.type("knife")
    expect(page.locator("button.result")).to_have_count(1)
    page.keyboard.press("ArrowDown")
    expect(page.locator("button.result").first).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#detail-title")).to_have_text("Chef's knife 20 cm")
    # Never stocked here: the page says so rather than failing.
    expect(page.locator("#here-available")).to_have_text("0")


def test_a_sale_updates_the_open_page_without_reload(stack, page):
    show(page, stack.a.url, "kettle", pick="Electric kettle 1.7 l")
    _, before = stack.a.request("GET", "/v1/availability/SKU-KET-17")
    expect_figures(page, before)
    page.evaluate("window.__sameDocument = true")
    post(stack.a, {"type": "sold", "sku": "SKU-KET-17", "qty": 3, "location": "floor"})
    # Well under the page's 5 s refresh: the server-sent event brought it.
    expect(page.locator("#here-available")).to_have_text(str(before["here"]["available"] - 3), timeout=4_000)
    expect(page.locator("#here-floor")).to_have_text(str(before["here"]["floor"] - 3))
    # The result list's figure follows too, and nothing reloaded the page.
    expect(page.locator("button.result", has_text="Electric kettle 1.7 l")).to_contain_text(
        f"{before['here']['available'] - 3} here")
    assert page.evaluate("window.__sameDocument") is True


def test_stopping_the_hub_turns_the_page_stale(stack, page):
    show(page, stack.a.url, "kettle", pick="Electric kettle 1.7 l")
    snapshot = page.locator("#snapshot")
    expect(snapshot).to_have_attribute("data-state", "fresh")
    expect(page.locator("#link-status")).to_have_attribute("data-state", "online")
    stack.hub.terminate()
    try:
        expect(snapshot).to_have_attribute("data-state", "stale", timeout=20_000)
        expect(snapshot).to_contain_text("Offline / stale")
        expect(page.locator("#link-status")).to_have_attribute("data-state", "stale")
        # This store's own figures stay live while the hub is away.
        _, before = stack.a.request("GET", "/v1/availability/SKU-KET-17")
        post(stack.a, {"type": "received", "sku": "SKU-KET-17", "qty": 5, "location": "floor"})
        expect(page.locator("#here-available")).to_have_text(str(before["here"]["available"] + 5))
    finally:
        stack.hub.start()
    wait_until(lambda: not stack.a.request("GET", "/v1/availability/SKU-KET-17")[1]["snapshot"]["stale"],
               timeout=20, what="a fresh snapshot after the hub restarted")
    expect(snapshot).to_have_attribute("data-state", "fresh", timeout=20_000)
