"""The kiosk survives its agent going away: the service worker's shell and the kept answers.

Real Chromium, a real agent SIGKILLed (or frozen with SIGSTOP) and started again on its
port: a reload while it is down shows the page with the last figures, marked as such, and
"cannot reach the stock service"; once it is back the page shows live figures again.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request

from playwright.sync_api import expect

from agent.kiosk import shell_version
from tests.kiosk.conftest import post

DOWN = re.compile("cannot reach the stock service", re.IGNORECASE)
LAST_KNOWN = re.compile(r"^Last known at \d\d:\d\d · cannot reach the stock service$")


def open_kettle(page, url: str) -> dict:
    """Open the 1.7 l kettle; return the figures the page shows once the worker controls it."""
    page.goto(url + "/")
    page.get_by_label("Find a product by name or SKU").fill("kettle")
    page.keyboard.press("Enter")
    page.locator("button.result", has_text="Electric kettle 1.7 l").click()
    expect(page.locator("#detail")).to_have_attribute("data-freshness", "live")
    # The worker takes the page over once it has installed the shell (clients.claim).
    page.wait_for_function("navigator.serviceWorker.controller !== null")
    return {field: page.locator(f"#here-{field}").inner_text() for field in ("available", "floor", "reserved")}


def expect_last_known(page, shown: dict, timeout_ms: int = 15_000) -> None:
    assert page.title().startswith("Stock check"), page.content()[:500]
    expect(page.locator("#link-status")).to_have_text(DOWN, timeout=timeout_ms)
    expect(page.locator("#link-status")).to_have_attribute("data-state", "down")
    expect(page.locator("#last-known")).to_have_text(LAST_KNOWN)
    expect(page.locator("#detail")).to_have_attribute("data-freshness", "last-known")
    expect(page.locator("#detail-title")).to_have_text("Electric kettle 1.7 l")
    for field, value in shown.items():
        expect(page.locator(f"#here-{field}")).to_have_text(value)
    expect(page.locator("button.result", has_text="Electric kettle 1.7 l")).to_be_visible()


def expect_live(page, stack) -> None:
    _, answer = stack.a.request("GET", "/v1/availability/SKU-KET-17")
    expect(page.locator("#here-available")).to_have_text(str(answer["here"]["available"]), timeout=20_000)
    expect(page.locator("#detail")).to_have_attribute("data-freshness", "live")
    expect(page.locator("#last-known")).to_be_hidden()
    expect(page.locator("#link-status")).not_to_have_attribute("data-state", "down")


def test_a_reload_with_the_agent_killed_shows_the_last_figures_then_recovers(stack, page):
    shown = open_kettle(page, stack.a.url)
    stack.a.kill()
    try:
        page.reload()
        expect_last_known(page, shown)
        # Another product searched meanwhile: the page says it cannot, and keeps the rest.
        page.get_by_label("Find a product by name or SKU").fill("toaster")
        page.keyboard.press("Enter")
        expect(page.locator("#results-summary")).to_have_text(re.compile("Cannot search"))
        expect(page.locator("#last-known")).to_have_text(LAST_KNOWN)
    finally:
        stack.a.start()
    # Back, with a change made while the page was looking at its last known figures.
    post(stack.a, {"type": "received", "sku": "SKU-KET-17", "qty": 2, "location": "floor"})
    expect_live(page, stack)
    assert page.locator("#here-available").inner_text() != shown["available"]


def test_a_reload_with_the_agent_frozen_falls_back_to_the_shell(stack, page):
    shown = open_kettle(page, stack.a.url)
    os.kill(stack.a.proc.pid, signal.SIGSTOP)
    try:
        # The worker waits 4 s for the network, then serves the kept shell; the page waits
        # 4 s for its first answer, then says it cannot reach the service.
        page.reload(timeout=30_000)
        expect_last_known(page, shown, timeout_ms=30_000)
    finally:
        os.kill(stack.a.proc.pid, signal.SIGCONT)
    expect_live(page, stack)


def test_the_worker_is_served_for_the_whole_page_and_replaces_older_shells(stack, page):
    with urllib.request.urlopen(stack.a.url + "/kiosk/kiosk-sw.js", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/javascript")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["Service-Worker-Allowed"] == "/"   # its scope may be / from /kiosk/
        script = resp.read().decode()
    page.goto(stack.a.url + "/healthz")   # same origin, no worker yet
    page.evaluate("""async () => {
        const old = await caches.open("edge-kiosk-shell-0.0.1-000000000000");
        await old.put("/", new Response("an older release's page"));
    }""")
    page.goto(stack.a.url + "/")
    page.wait_for_function("navigator.serviceWorker.controller !== null")
    version = page.locator('meta[name="kiosk-version"]').get_attribute("content")
    assert f'const VERSION = "{version}";' in script
    assert page.evaluate("navigator.serviceWorker.controller.scriptURL") == stack.a.url + "/kiosk/kiosk-sw.js"
    assert page.evaluate("(async () => (await navigator.serviceWorker.ready).scope)()") == stack.a.url + "/"
    # The older release's cache is gone; this release's holds the shell.
    assert page.wait_for_function("""async (want) => {
        const names = await caches.keys();
        return names.length === 1 && names[0] === want && names;
    }""", arg=f"edge-kiosk-shell-{version}").json_value() == [f"edge-kiosk-shell-{version}"]
    kept = page.evaluate(f"""async () => {{
        const cache = await caches.open("edge-kiosk-shell-{version}");
        return (await cache.keys()).map((r) => new URL(r.url).pathname).sort();
    }}""")
    assert kept == ["/", "/kiosk/kiosk.css", "/kiosk/kiosk.js"]


def test_the_shell_version_changes_with_any_shell_file_or_the_release():
    files = {"index.html": b"<html>", "kiosk.js": b"1", "kiosk.css": b"a", "kiosk-sw.js": b"w"}
    base = shell_version("0.1.0", files)
    assert base == shell_version("0.1.0", dict(files))
    assert base.startswith("0.1.0-")
    assert shell_version("0.1.1", files) != base
    for name in files:
        assert shell_version("0.1.0", {**files, name: files[name] + b" "}) != base
