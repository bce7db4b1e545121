"""Screenshots of the kiosk for the docs, from a real demo run: `python -m demo.screenshots`.

Starts the demo in a temporary directory, drives Debian's Chromium with Playwright
(never a downloaded browser) and writes docs/img/kiosk-{wide,phone,offline,cap,agent-down}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"screenshots: timed out waiting for {what}")


def get(url: str):
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.loads(resp.read())


def agent_pid(state: Path, store_id: str) -> int:
    """The pid of the demo's `edge-agent run --config STATE/STORE.toml`."""
    config = str(state / f"{store_id}.toml").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in argv and config in argv:
                return int(entry.name)
    raise RuntimeError(f"screenshots: no agent process for {store_id}")


def shoot(urls: dict[str, str], state: Path, out_dir: Path, capped: str) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    def search(page, url: str, query: str) -> None:
        page.goto(url + "/")
        page.get_by_label("Find a product by name or SKU").fill(query)
        page.keyboard.press("Enter")
        page.locator("button.result").first.wait_for()
        page.locator("button.result:not(:has(.avail.none))").first.click()
        page.locator("#nearby li[data-store-id]").first.wait_for()
        page.wait_for_timeout(300)   # let the last figures paint

    written = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        wide = browser.new_page(viewport={"width": 1920, "height": 1080})
        search(wide, urls["store-1"], "kettle")
        written.append(out_dir / "kiosk-wide.png")
        wide.screenshot(path=written[-1])
        sku = wide.locator("#detail-sku").inner_text()

        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                 is_mobile=True, has_touch=True)
        phone.goto(urls["store-1"] + "/")   # by SKU: a single exact match opens at once
        phone.get_by_label("Find a product by name or SKU").fill(sku)
        phone.keyboard.press("Enter")
        expect(phone.locator("#detail-sku")).to_have_text(sku)
        phone.locator("#nearby li[data-store-id]").first.wait_for()
        phone.wait_for_timeout(300)
        written.append(out_dir / "kiosk-phone.png")
        phone.screenshot(path=written[-1])

        subprocess.run([sys.executable, "-m", "demo", "--state-dir", str(state), "link", "store-2", "down"],
                       check=True, capture_output=True, timeout=30)
        offline = browser.new_page(viewport={"width": 1280, "height": 800})
        search(offline, urls["store-2"], "towel")
        expect(offline.locator("#snapshot")).to_have_attribute("data-state", "stale", timeout=60_000)
        expect(offline.locator("#link-status")).to_have_attribute("data-state", "offline", timeout=15_000)
        written.append(out_dir / "kiosk-offline.png")
        offline.screenshot(path=written[-1])

        # The capped product with its sources; then its agent frozen and the page reloaded.
        cap = browser.new_page(viewport={"width": 1280, "height": 1000})
        cap.goto(urls["store-1"] + "/")
        cap.get_by_label("Find a product by name or SKU").fill(capped)
        cap.keyboard.press("Enter")
        expect(cap.locator("#cap")).to_be_visible(timeout=30_000)
        expect(cap.locator("#sources li.source")).to_have_count(3, timeout=30_000)
        cap.wait_for_function("navigator.serviceWorker.controller !== null")
        cap.wait_for_timeout(300)
        written.append(out_dir / "kiosk-cap.png")
        cap.screenshot(path=written[-1], full_page=True)
        pid = agent_pid(state, "store-1")
        os.kill(pid, signal.SIGSTOP)   # stopped, not killed: the demo would stop on a dead child
        try:
            cap.reload(timeout=30_000)
            expect(cap.locator("#last-known")).to_contain_text("cannot reach the stock service", timeout=30_000)
            cap.wait_for_timeout(300)
            written.append(out_dir / "kiosk-agent-down.png")
            cap.screenshot(path=written[-1], full_page=True)
        finally:
            os.kill(pid, signal.SIGCONT)
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img", help="where to write the PNGs (default docs/img)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-demo-shots-") as tmp:
        state, log = Path(tmp) / "state", Path(tmp) / "demo.out"
        with open(log, "wb") as sink:
            demo = subprocess.Popen([sys.executable, "-m", "demo", "--state-dir", str(state), "--rate", "10",
                                     "--port-base", "0", "--status-every", "0", "--max-age", "8"],
                                    stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            text = wait_for(lambda: "Ctrl-C stops" in log.read_text() and log.read_text(), 90, "the demo to start")
            urls = dict(re.findall(r"(store-\d+) kiosk: (http://127\.0\.0\.1:\d+)/", text))
            capped = re.search(r"capped: (\S+),", text).group(1)
            for url in urls.values():
                wait_for(lambda: (get(url + "/v1/sync").get("acked_seq") or 0) > 600, 60, "traffic at the hub")
            time.sleep(3)   # a few snapshot rounds, so nearby figures include today's traffic
            for path in shoot(urls, state, out_dir, capped):
                print(f"wrote {path}")
        finally:
            demo.send_signal(signal.SIGINT)
            status = demo.wait(60)
    return status


if __name__ == "__main__":
    sys.exit(main())
