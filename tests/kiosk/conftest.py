"""Fixtures for the kiosk suite: headless Debian Chromium, and a real broker, hub and agents.

The browser is Debian's `chromium` driven by Playwright (never a downloaded browser).
`stack` runs mosquitto, `edge-hub run` with a catalog, and two stores of one region:
`store-a` (the kiosk under test) and `store-b` (its nearby store).
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support.agentproc import AgentProcess
from tests.support.broker import Broker
from tests.sync.helpers import wait_until
from tests.sync.hubproc import HubProcess

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CATALOG = [("SKU-KET-17", "Electric kettle 1.7 l"), ("SKU-KET-10", "Electric kettle 1.0 l"),
           ("SKU-TST-2", "Toaster 2-slice"), ("SKU-KNF-20", "Chef's knife 20 cm"),
           ("CHURN-1", "Test churn item")]
MAX_AGE_S = 3
# The hub's configured sources (test_kiosk_sources.py publishes their feeds).
SOURCES = [
    {"id": "wh-1", "name": "Central warehouse", "kind": "warehouse", "lead_time_s": 86_400, "stale_after_s": 3600},
    {"id": "partner-north", "name": "Partner North", "kind": "partner", "lead_time_s": 2 * 86_400,
     "stale_after_s": 3600},
    {"id": "supplier-x", "name": "Supplier X", "kind": "supplier", "lead_time_s": 3 * 86_400, "stale_after_s": 4},
]



def post(agent: AgentProcess, *events: dict) -> dict:
    status, body = agent.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": list(events)})
    assert status == 201, body
    return body


# Module scope, not session: sync_playwright marks an event loop as running in this thread
# until it stops, which would break every asyncio test collected after this module.
@pytest.fixture(scope="module")
def browser():
    executable = require_binary("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class PinnedAgent(AgentProcess):
    """An agent that comes back on the port it first had.

    A page's service worker and the answers it kept belong to one origin (host and port):
    a restarted kiosk agent must answer where the page already looks.
    """

    pinned = 0

    def _write_config(self) -> None:
        if self.pinned:
            self.port = self.pinned
        super()._write_config()
        self.pinned = self.port


class Stack:
    def __init__(self, root: Path):
        self.broker = Broker(root / "broker").start()
        catalog = root / "catalog.csv"
        catalog.write_text("sku,name\n" + "".join(f'{sku},"{name}"\n' for sku, name in CATALOG))
        sources = "".join("[[sources]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in source.items())
                          for source in SOURCES)
        self.hub = HubProcess(root / "hub", self.broker, stores=("store-a", "store-b"), extra=(
            f'[availability]\npublish_interval_s = 0.3\n[catalog]\npath = "{catalog}"\n{sources}'))
        self.hub.start()
        sections = {"mqtt": {"port": self.broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                    "availability": {"max_age_s": MAX_AGE_S}, "sync": {"ack_timeout_s": 2},
                    "log": {"format": "text"}}
        (root / "a").mkdir()
        (root / "b").mkdir()
        self.a = PinnedAgent(root / "a", store_id="store-a", sections=sections).start()
        self.b = AgentProcess(root / "b", store_id="store-b", sections=sections).start()
        self._stop = threading.Event()
        self._churn = threading.Thread(target=self._churn_b, name="churn", daemon=True)

    def _churn_b(self) -> None:
        # Keeps store-a's snapshot changing (its nearby store's stock moves), so with the
        # hub up every snapshot is fresh and "stale" can only mean the hub went away.
        flip = False
        while not self._stop.wait(0.25):
            kind = "sold" if flip else "received"
            flip = not flip
            try:
                self.b.request("POST", "/v1/events", {"command_id": str(uuid.uuid4()), "events": [
                    {"type": kind, "sku": "CHURN-1", "qty": 1, "location": "floor"}]}, timeout=2)
            except OSError:
                pass

    def close(self) -> None:
        """Stop whatever started (also after a failed start)."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            if self._churn.is_alive():
                self._churn.join(5)
        for name in ("a", "b", "hub"):
            proc = getattr(self, name, None)
            if proc is not None and proc.running:
                proc.kill()
        if getattr(self, "broker", None) is not None:
            self.broker.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    built = Stack.__new__(Stack)
    try:
        built.__init__(tmp_path_factory.mktemp("kiosk"))
        post(built.a, {"type": "received", "sku": "SKU-KET-17", "qty": 10, "location": "backroom"},
             {"type": "received", "sku": "SKU-KET-17", "qty": 4, "location": "floor"},
             {"type": "reserved", "sku": "SKU-KET-17", "qty": 2, "reservation_id": "R-1"},
             {"type": "received", "sku": "SKU-TST-2", "qty": 3, "location": "floor"})
        post(built.b, {"type": "received", "sku": "SKU-KET-17", "qty": 7, "location": "floor"},
             {"type": "received", "sku": "CHURN-1", "qty": 5})
        built._churn.start()
        # The hub's catalog and a snapshot naming store-b's stock reach store-a.
        wait_until(lambda: any(i["name"] for i in built.a.request("GET", "/v1/search?q=kettle")[1]["items"]),
                   timeout=20, what="the catalog at store-a")
        wait_until(lambda: {"store_id": "store-b", "available": 7} in built.a.request(
            "GET", "/v1/availability/SKU-KET-17")[1]["nearby"], timeout=20, what="store-b in store-a's snapshot")
        yield built
    finally:
        built.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()
