"""The kiosk: a self-contained web page served by the agent, and the endpoints it reads.

`setup_kiosk(app, ctx)` adds:

* `GET /` the page (`?q=TEXT` opens it on a search), `GET /kiosk/{file}` its script and
  style sheet (agent/static/; no CDN, the store may be offline).
* `GET /kiosk/kiosk-sw.js` the page's service worker. It caches the page shell (the page,
  its script and style) so that a reload while this agent is down still shows the page,
  with the last figures the page kept and "cannot reach the stock service". It is served
  with `Service-Worker-Allowed: /`, so that it may take the scope `/` and cover the page
  from beside the other assets. Its cache is named after `shell_version()`, a hash of the
  package version and the shell's files: an agent release that changes the shell replaces
  the cached one.
* `GET /v1/search?q=TEXT&limit=N` products whose SKU or catalog name matches:
  `{"query", "items": [{"sku", "name", "available"}]}`, exact SKU first. Names come
  from the hub's catalog (`P/catalog`, kept by the sync process in sync.db and read
  through agent/syncview.py); without a catalog a SKU with stock history still
  matches itself.
* `GET /v1/stream` server-sent events: `hello` on connect, then `stock`
  `{"last_seq", "skus"}` after every commit that appended events, and a comment line as
  a heartbeat. A client that falls behind gets `resync` and should re-read everything.

The page reads the stock itself from the contract's `GET /v1/availability/{sku}` and
`GET /v1/sync`, so the kiosk shows exactly what the API answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import re
from importlib import metadata, resources
from typing import Any, Callable

from aiohttp import web

from agent.api_errors import ApiError, int_param, only_params
from agent.events import SKU_PATTERN

log = logging.getLogger("edge_agent.kiosk")

STATIC_FILES = {
    "kiosk.css": "text/css",
    "kiosk.js": "text/javascript",
}
SERVICE_WORKER = "kiosk-sw.js"
SEARCH_LIMIT_MAX = 50
HEARTBEAT_S = 15.0
CLIENT_QUEUE_MAX = 256
_SKU = re.compile(SKU_PATTERN)


def _static(name: str) -> bytes:
    return resources.files("agent").joinpath("static", name).read_bytes()


def _package_version() -> str:
    try:
        return metadata.version("store-edge-agent")
    except metadata.PackageNotFoundError:
        return "0"


def shell_version(package_version: str, files: dict[str, bytes]) -> str:
    """Name one release of the page shell: the same version and files give the same name.

    The service worker's cache is `edge-kiosk-shell-<this>`; a change to any shell file or
    to the package version gives a new service worker script, which the browser installs,
    and whose activation deletes the older caches.
    """
    digest = hashlib.sha256(package_version.encode())
    for name in sorted(files):
        digest.update(b"\0" + name.encode() + b"\0" + files[name])
    return f"{package_version}-{digest.hexdigest()[:12]}"


def search(text: str, catalog: Any, stock: Callable[[str], dict | None], limit: int) -> list[dict]:
    """Return up to `limit` {sku, name, available} matching `text`, an exact SKU first.

    Names come from the catalog; a SKU the catalog does not list still matches itself
    when the store has stock history for it (name ""). `available` is this store's.
    """
    text = text.strip()
    if not text:
        return []
    found = catalog.search(text, limit) if catalog is not None else []
    exact = [item for item in found if item["sku"] == text]
    if not exact and _SKU.match(text) and stock(text) is not None:
        exact = [{"sku": text, "name": (catalog.name(text) if catalog is not None else None) or ""}]
    ordered = exact + [item for item in found if item["sku"] != text]
    items = []
    for item in ordered[:limit]:
        row = stock(item["sku"])
        items.append({"sku": item["sku"], "name": item["name"], "available": row["available"] if row else 0})
    return items


class StockFeed:
    """Fans the log's commits out to the open event streams, one bounded queue each."""

    def __init__(self) -> None:
        self._clients: set[asyncio.Queue] = set()
        self.closing = asyncio.Event()

    def on_commit(self, events: list[Any]) -> None:
        """The log's listener: queue one `stock` message for every client."""
        if not events or not self._clients:
            return
        skus = sorted({sku for event in events if (sku := getattr(event, "sku", None))})
        message = ("stock", {"last_seq": events[-1].seq, "skus": skus})
        for queue in list(self._clients):
            if queue.full():
                # A slow client loses detail, not correctness: it re-reads everything.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(("resync", {"last_seq": events[-1].seq}))
            else:
                queue.put_nowait(message)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_QUEUE_MAX)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._clients.discard(queue)

    @property
    def clients(self) -> int:
        return len(self._clients)


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def setup_kiosk(app: web.Application, ctx: Any) -> StockFeed:
    """Add the page, its assets and service worker, search and the live stream; return the feed."""
    feed = StockFeed()
    ctx.log.add_listener(feed.on_commit)
    store_id = html.escape(ctx.config.store.id)
    shell = {name: _static(name) for name in ("index.html", SERVICE_WORKER, *STATIC_FILES)}
    version = shell_version(_package_version(), shell).encode()
    page = shell["index.html"].replace(b"{{store_id}}", store_id.encode()).replace(b"{{version}}", version)
    assets = {name: (shell[name], kind, {}) for name, kind in STATIC_FILES.items()}
    assets[SERVICE_WORKER] = (shell[SERVICE_WORKER].replace(b"{{version}}", version), "text/javascript",
                              {"Service-Worker-Allowed": "/"})

    async def index(request: web.Request) -> web.Response:
        only_params(request.query, "q")
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.Response:
        only_params(request.query)
        found = assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, kind, headers = found
        # no-cache: revalidated at every load, so the browser sees a new release (and a new
        # service worker) as soon as the agent serves one.
        return web.Response(body=body, content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache", **headers})

    async def search_handler(request: web.Request) -> web.Response:
        only_params(request.query, "q", "limit")
        query = request.query.get("q", "")
        limit = int_param("limit", request.query.get("limit", "20"), 1, SEARCH_LIMIT_MAX)
        if len(query) > 200:
            raise ApiError(400, "invalid", "q must be at most 200 characters", "q")
        items = search(query, ctx.sync, ctx.queries.stock, limit)
        return web.json_response({"query": query, "items": items})

    async def stream(request: web.Request) -> web.StreamResponse:
        only_params(request.query)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = feed.subscribe()
        closing = asyncio.create_task(feed.closing.wait())
        try:
            await response.write(b"retry: 2000\n" + _sse("hello", {"last_seq": ctx.log.last_seq}))
            while not feed.closing.is_set():
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, closing}, timeout=HEARTBEAT_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    kind, data = getter.result()
                    await response.write(_sse(kind, data))
                else:
                    getter.cancel()
                    if not done:
                        await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass
        finally:
            closing.cancel()
            feed.unsubscribe(queue)
        return response

    async def close_streams(app: web.Application) -> None:
        # Open streams never end by themselves; without this, shutdown waits for them.
        feed.closing.set()

    app.router.add_get("/", index)
    app.router.add_get("/kiosk/{name}", asset)
    app.router.add_get("/v1/search", search_handler)
    app.router.add_get("/v1/stream", stream)
    app.on_shutdown.append(close_streams)
    return feed
