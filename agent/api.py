"""The local HTTP API for kiosks, POS and scanners (the contract's HTTP table).

`build_app(ctx)` returns the aiohttp Application; `start_api(ctx)` binds it on
`api.host:api.port` inside the caller's event loop and returns the server (agent/server.py),
whose `cleanup()` stops accepting, lets in-flight requests finish and closes connections.
In front of the handlers, agent/guard.py checks Host, Origin, Content-Type and rate limits,
and agent/connections.py caps the connections and times out slow and idle ones.

Writes go through `SqliteEventLog.append`, which group-commits concurrent requests in
one transaction and answers each with its own seqs or its own refusal. Reads are point
queries on the log's read-only connection, cheap enough to run on the event loop.
Every refusal is a 4xx `{"error": {"code", "message", "field"?}}` and appends nothing;
storage trouble is 507 (disk full) or 503, never a 2xx.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from agent import events as ev
from agent.api_errors import ERROR_CODE, MAX_BODY, ApiError, error_response, from_http_exception, only_params
from agent.api_errors import int_param as _int_param
from common import faults
from common.errors import StorageError, StorageFull
from agent.inventory import Refused
from agent.kiosk import setup_kiosk
from agent.server import FRONT_DOOR, LISTEN_BACKLOG, ApiServer, front_door
from agent.openapi import openapi_document

if TYPE_CHECKING:
    from agent.context import AgentContext

log = logging.getLogger("edge_agent.api")

_SKU = re.compile(ev.SKU_PATTERN)
EVENTS_PAGE_DEFAULT = 100
EVENTS_PAGE_MAX = 1000
_JSON = "application/json"


class Api:
    """The handlers, bound to one agent's context."""

    def __init__(self, ctx: "AgentContext"):
        self.ctx = ctx
        self.log = ctx.log
        self.reader = ctx.queries
        self.metrics = ctx.metrics
        token = ctx.config.write_token()
        self._token = token.encode() if token else None
        self._openapi: bytes | None = None

    # ------------------------------------------------------------- plumbing

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Map every failure to the error shape; time every request by route."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
        except Refused as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.field, extra=exc.extra)
        except StorageFull as exc:
            response = error_response(507, "storage_full", str(exc))
        except StorageError as exc:
            response = error_response(503, "storage_unavailable", str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = from_http_exception(exc, request.method, request.path)
        except Exception as exc:  # a bug: answer in our shape, keep serving
            log.exception("api: %s %s failed", request.method, request.path)
            response = error_response(500, "internal", f"internal error: {type(exc).__name__}")
        if 400 <= response.status < 500:
            _log_refusal(request, response)
        if self.metrics is not None:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            self.metrics.observe_request(route, request.method, time.perf_counter() - started)
            if response.status >= 400:
                self.metrics.count_refusal(response.get(ERROR_CODE, str(response.status)))
        return response

    def authorize(self, request: web.Request) -> None:
        """Check the write token in constant time; no token configured: writes are open."""
        if self._token is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", "writes need Authorization: Bearer <write token>",
                           headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(403, "forbidden", "the bearer token is not this agent's write token")

    # --------------------------------------------------------------- writes

    async def post_events(self, request: web.Request) -> web.Response:
        """Append a command's events (all or none); idempotent by command_id."""
        self.authorize(request)
        fence = self.ctx.rehydrator.fence() if self.ctx.rehydrator is not None else None
        if fence is not None:   # the log lacks history the hub holds (agent/rehydrate.py)
            raise ApiError(503, fence.code, fence.message)
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise ApiError(413, "body_too_large",
                           f"request body is {request.content_length} bytes, over the limit of {MAX_BODY} (1 MiB)")
        body = await request.read()
        try:
            command = ev.decode_command(body)
        except msgspec.ValidationError as exc:
            field = ev.field_of(exc)
            raise ApiError(422, "invalid", f"{field or 'body'}: {exc}", field) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not a JSON object: {exc}") from None
        result = await self.log.append(command)
        faults.point("agent.after_commit")
        answer = {"command_id": result.command_id, "first_seq": result.first_seq,
                  "last_seq": result.last_seq, "duplicate": result.duplicate}
        return _json(answer, 200 if result.duplicate else 201)

    # ---------------------------------------------------------------- reads

    async def get_stock(self, request: web.Request) -> web.Response:
        """The SKU's stock now, after events 1..as_of_seq, or as the log stood at time as_of."""
        only_params(request.query, "as_of_seq", "as_of")
        sku = _sku(request)
        raw = request.query.get("as_of_seq")
        at = request.query.get("as_of")
        if raw is not None and at is not None:
            raise ApiError(400, "invalid", "give as_of_seq or as_of, not both", "as_of")
        if at is not None:
            seq = self._seq_at(at)
            row = self.reader.stock_as_of(sku, seq)
            if row is None:
                raise ApiError(404, "unknown_sku", f"no event had touched SKU {sku!r} by {at}", "sku")
            return _json(dict(row, as_of=at, as_of_seq=seq))
        if raw is None:
            row = self.reader.stock(sku)
        else:
            seq = _int_param("as_of_seq", raw, 0)
            last = self.log.last_seq
            if seq > last:
                raise ApiError(400, "invalid", f"as_of_seq {seq} is beyond the log's last seq {last}", "as_of_seq")
            row = self.reader.stock_as_of(sku, seq)
        if row is None:
            where = "" if raw is None else f" by seq {raw}"
            raise ApiError(404, "unknown_sku", f"no event has touched SKU {sku!r}{where}", "sku")
        return _json(row)

    def _seq_at(self, at: str) -> int:
        """The log's last seq at time `at`; ApiError naming `as_of` for a bad or future time."""
        if not ev.valid_time(at):
            raise ApiError(400, "invalid", f"as_of {at[:64]!r} is not an RFC 3339 UTC time such as"
                                           " 2026-11-27T13:00:00Z", "as_of")
        cut = ev.to_ms_precision(at)
        seq = self.reader.seq_at(cut)
        now = self.ctx.now()
        # A time after the clock has no final answer yet, unless the log already holds an
        # event recorded after it (the clock went back): then the cut is fixed.
        if cut > now and seq >= self.log.last_seq:
            raise ApiError(400, "invalid", f"as_of {at} is after the agent's clock ({now})", "as_of")
        return seq

    async def get_availability(self, request: web.Request) -> web.Response:
        only_params(request.query)
        return _json(self.ctx.availability(_sku(request)))

    async def get_events(self, request: web.Request) -> web.Response:
        """Return a page of the log in seq order, bodies as stored (current schema)."""
        only_params(request.query, "after_seq", "limit")
        query = request.query
        after = _int_param("after_seq", query.get("after_seq", "0"), 0)
        limit = _int_param("limit", query.get("limit", str(EVENTS_PAGE_DEFAULT)), 1, EVENTS_PAGE_MAX)
        rows = self.reader.events_after(after, limit)
        next_after = rows[-1][0] if rows else after
        # Bodies are already canonical JSON: splice them instead of decoding and re-encoding.
        body = b"".join((b'{"events":[', b",".join(body for _, body in rows),
                         b'],"next_after_seq":%d,"last_seq":%d}' % (next_after, self.log.last_seq)))
        return web.Response(body=body, content_type=_JSON)

    async def get_sync(self, request: web.Request) -> web.Response:
        only_params(request.query)
        return _json(self.ctx.sync_status())

    # ------------------------------------------------------------ operations

    async def healthz(self, request: web.Request) -> web.Response:
        only_params(request.query)
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        only_params(request.query)
        if not self.ctx.ready:
            return _json({"status": "not_ready"}, 503)
        alarm = self.ctx.link_alarm()   # local reads still work; the box is not as configured
        if alarm is not None:
            return _json({"status": "not_ready", "reason": alarm["code"], "alarm": alarm}, 503)
        fence = self.ctx.rehydrator.fence() if self.ctx.rehydrator is not None else None
        if fence is not None:   # reads work; writes wait for the hub's history
            return _json({"status": "not_ready", "reason": fence.code, "message": fence.message,
                          "last_seq": fence.last_seq, "hub_acked_seq": fence.hub_acked_seq}, 503)
        return _json({"status": "ready", "last_seq": self.log.last_seq})

    async def metrics_text(self, request: web.Request) -> web.Response:
        only_params(request.query)
        if self.metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled in this agent")
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        only_params(request.query)
        if self._openapi is None:
            routes = [(r.method, r.resource.canonical) for r in request.app.router.routes()
                      if r.resource is not None]
            self._openapi = msgspec.json.encode(openapi_document(routes))
        return web.Response(body=self._openapi, content_type=_JSON)


# (method, path, handler name): the one list the router and the OpenAPI document share.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("POST", "/v1/events", "post_events"),
    ("GET", "/v1/events", "get_events"),
    ("GET", "/v1/stock/{sku}", "get_stock"),
    ("GET", "/v1/availability/{sku}", "get_availability"),
    ("GET", "/v1/sync", "get_sync"),
    ("GET", "/metrics", "metrics_text"),
    ("GET", "/openapi.json", "openapi"),
)


def build_app(ctx: "AgentContext") -> web.Application:
    """Return the API application for `ctx` (not yet bound to a socket)."""
    api = Api(ctx)
    # Host, Origin, Content-Type, rate limits, token before body, connection state (agent/guard.py)
    front = front_door(ctx, authorize=api.authorize)
    app = web.Application(middlewares=[front.middleware, api.guard], client_max_size=MAX_BODY)
    app[FRONT_DOOR] = front
    for method, path, name in ROUTES:
        app.router.add_route(method, path, getattr(api, name), name=name)
    setup_kiosk(app, ctx)  # GET /, /kiosk/*, /v1/search, /v1/stream (agent/kiosk.py)
    return app


# How long SIGTERM waits on open HTTP connections. aiohttp's graceful shutdown waits this
# long on every connection, including one accepted just before the stop whose client has not
# sent a request yet (aio-libs/aiohttp#8179). A write in flight needs one group commit
# (milliseconds), so a short drain keeps every answered write and leaves the rest of the
# 10 s stop budget to the log and sync.
SHUTDOWN_DRAIN_S = 3.0


async def start_api(ctx: "AgentContext") -> tuple[ApiServer, list[tuple[str, int]]]:
    """Bind the API on the configured host and port; return the server and bound addresses.

    `api.port = 0` binds a free port (tests); the addresses say which. Raises OSError
    when the address cannot be bound.
    """
    app = build_app(ctx)
    server = ApiServer(app, ctx.config.api, app[FRONT_DOOR].connections, ctx.metrics, LISTEN_BACKLOG,
                       drain_s=SHUTDOWN_DRAIN_S)
    await server.start()
    return server, server.addresses


def _log_refusal(request: web.Request, response: web.StreamResponse) -> None:
    """Log a refused request once, with its reason: writes at INFO, reads (a kiosk's 404) at DEBUG."""
    level = logging.DEBUG if request.method in ("GET", "HEAD") else logging.INFO
    if not log.isEnabledFor(level):
        return
    try:
        error = msgspec.json.decode(response.body)["error"]
    except (msgspec.DecodeError, KeyError, TypeError):
        error = {}
    field = f" ({error['field']})" if error.get("field") else ""
    log.log(level, "api: refused %s %s: %d %s%s: %s", request.method, request.path, response.status,
            error.get("code", "?"), field, error.get("message", ""))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type=_JSON)


def _sku(request: web.Request) -> str:
    sku = request.match_info["sku"]
    if not _SKU.fullmatch(sku):
        raise ApiError(400, "invalid", f"sku {sku[:80]!r} does not match {ev.SKU_PATTERN}", "sku")
    return sku
