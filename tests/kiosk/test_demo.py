"""The one-command demo: starts, sends traffic that reaches the hub, shows a capped product and
two partner/supplier sources on the kiosk, pulls a link, stops on SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import expect

from tests.conftest import require_binary
from tests.sync.helpers import wait_until
from tests.support.procs import processes_under


def get(url: str):
    with urllib.request.urlopen(url, timeout=3) as resp:
        body = resp.read()
        return json.loads(body) if "json" in resp.headers.get("Content-Type", "") else body.decode()


def demo_cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demo", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=30)


def kiosk_shows_the_cap_and_the_sources(browser, url: str, sku: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(url + "/")
        page.get_by_label("Find a product by name or SKU").fill(sku)
        page.keyboard.press("Enter")
        expect(page.locator("#detail-sku")).to_have_text(sku)
        expect(page.locator("#cap")).to_have_text(re.compile(r"^Limit 2 per week, (\d+|none) left"))
        for source_id, text in (("partner-north", "Partner North: "), ("supplier-x", "Supplier X: ")):
            row = page.locator(f'#sources li[data-source-id="{source_id}"]')
            expect(row).to_contain_text(text)
            expect(row).to_contain_text(re.compile(r"delivery in \d+ days, (updated|not updated for)"))
        expect(page.locator('#sources li[data-source-id="wh-central"]')).to_contain_text("Central warehouse: ")
    finally:
        context.close()


def test_demo_runs_traffic_to_the_hub_survives_a_pulled_link_and_stops_on_sigint(tmp_path, browser):
    require_binary("mosquitto")
    state = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "demo", "--state-dir", str(state), "--rate", "20", "--products", "60",
             "--port-base", "0", "--status-every", "0"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        text = wait_until(lambda: out.read_text() if "Ctrl-C stops" in out.read_text() or proc.poll() is not None else "",
                          timeout=60, what="the demo's banner")
        assert proc.poll() is None, text
        urls = dict(re.findall(r"(store-\d+) kiosk: (http://127\.0\.0\.1:\d+)/", text))
        assert sorted(urls) == ["store-1", "store-2", "store-3"], text
        assert "<title>Stock check" in get(urls["store-1"] + "/")

        # Opening stock is 120 events per store; traffic beyond that is acked by the hub.
        for store, url in urls.items():
            wait_until(lambda: get(url + "/v1/sync")["acked_seq"] > 125, timeout=60, what=f"hub acks for {store}")
        assert get(urls["store-1"] + "/v1/search?q=kettle")["items"], "the catalog reached store-1"

        # The capped product: its cap and its two partner/supplier sources reach every store.
        capped = re.search(r"capped: (SKU-\d+), limit 2 per week per store", text).group(1)
        for url in urls.values():
            answer = wait_until(lambda: (a := get(f"{url}/v1/availability/{capped}"))["cap"] and len(
                a["sources"]) == 3 and a, timeout=60, what=f"the cap and the sources at {url}")
            assert {k: answer["cap"][k] for k in ("limit", "scope", "period")} == {
                "limit": 2, "scope": "store", "period": "week"}, answer
            assert 0 <= answer["cap"]["left"] <= 2
            kinds = {s["source_id"]: s["kind"] for s in answer["sources"]}
            assert kinds == {"wh-central": "warehouse", "partner-north": "partner", "supplier-x": "supplier"}
        kiosk_shows_the_cap_and_the_sources(browser, urls["store-1"], capped)

        down = demo_cli(state, "link", "store-2", "down")
        assert down.returncode == 0 and "DOWN" in down.stdout, down
        wait_until(lambda: get(urls["store-2"] + "/v1/sync")["connected"] is False, timeout=20,
                   what="store-2 offline")
        cut = get(urls["store-2"] + "/v1/sync")
        # Offline, the store keeps taking traffic; the hub hears none of it.
        offline = wait_until(lambda: (s := get(urls["store-2"] + "/v1/sync"))["last_seq"] > cut["last_seq"] + 10 and s,
                             timeout=20, what="store-2 recording while offline")
        assert offline["acked_seq"] == cut["acked_seq"]

        up = demo_cli(state, "link", "store-2", "up")
        assert up.returncode == 0 and "UP" in up.stdout, up
        wait_until(lambda: get(urls["store-2"] + "/v1/sync")["acked_seq"] >= offline["last_seq"], timeout=30,
                   what="store-2 catching up")
        assert demo_cli(state, "link", "store-9", "down").returncode == 1

        children = processes_under(state)
        assert len(children) >= 5, children   # mosquitto, hub, three agents
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()[-3000:]
        assert "demo: stopped" in out.read_text()
        assert [pid for pid in children if Path(f"/proc/{pid}").exists()
                and b"Z" not in (Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1][:3])] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for pid in processes_under(state):
                os.kill(pid, signal.SIGKILL)
