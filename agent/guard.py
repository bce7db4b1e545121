"""The local API's front door: Host and Origin, Content-Type, and per-client rate limits.

`RequestGuard(api_settings, host_names, metrics)` is the API's outermost middleware
(`guard.middleware`). It refuses, before any handler runs and so with nothing appended:

* a `Host` that is not one of this agent's names (421 `misdirected`, field `Host`):
  a DNS-rebinding page reaches the agent under the attacker's name, which is not ours.
  An IP literal is accepted (a browser sends one only when it connected to that address
  itself) and so is `localhost` and any `*.localhost` (browsers resolve them to loopback);
* on a write (any method but GET, HEAD, OPTIONS, to a route that exists):
  - an `Origin` that is neither this page's own origin nor listed in `api.allowed_origins`
    (403 `cross_origin`, field `Origin`): a cross-site page's write;
  - a client over its write rate (429 `rate_limited` with `Retry-After`), or one whose
    failed authorizations (answers 401/403) used up their own, smaller budget;
  - a `Content-Type` other than `application/json` (415 `unsupported_media_type`, field
    `Content-Type`): no HTML form or `text/plain` fetch can then write without a CORS
    preflight, which this API never grants;
  - a wrong or missing write token (401/403, from the API's own `authorize`), before any
    of the body is read; then a body that does not arrive within `api.body_timeout_s`
    (408 `body_timeout`, and the connection is closed).

Reads are not rate limited: the kiosk's page and its polling must not be slowed by a
till. The guard also tells the connection table (agent/connections.py) when each request
starts and ends, which is what the header-read and idle timeouts are measured from.

Refusals are counted in `edge_agent_http_refused_total{code}` and, for rate limits, in
`edge_agent_http_rate_limited_total{limit}`; they are logged once per interval and code
with the number suppressed, so a flood of refusals cannot flood the journal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Iterable

from aiohttp import web

from agent.api_errors import ERROR_CODE, MAX_BODY, ApiError, error_response, from_http_exception
from common.logsetup import LogLimiter

if TYPE_CHECKING:
    from agent.connections import ConnectionTable
    from agent.metrics import Metrics
    from agent.settings import ApiSection

log = logging.getLogger("edge_agent.api")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOG_INTERVAL_S = 10.0
MAX_TRACKED_CLIENTS = 10_000


# ------------------------------------------------------------------ pure checks

def host_name(value: str) -> str | None:
    """Return the lower-case host name of a `Host` value (`name`, `name:port`, `[v6]:port`), or None."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not _is_port(value[end + 1:])):
            return None
        return value[1:end] or None
    name, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if sep and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in "/\\@ ?#"):
        return None
    return name


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_refusal(header: str | None, allowed: frozenset[str]) -> str | None:
    """Return why a `Host` header is refused, or None when this agent answers to it.

    No header (HTTP/1.0 clients) is accepted: a browser always sends one.
    """
    if header is None:
        return None
    name = host_name(header)
    if name is None:
        return f"Host {header[:80]!r} is not a host name"
    if _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in allowed:
        return None
    # The names are not listed: a rebinding page can read this answer.
    return (f"Host {name[:80]!r} is not one of this agent's names:"
            " add it to api.allowed_hosts to serve it under that name")


def _origin_key(scheme: str, authority: str) -> str:
    default = ":443" if scheme == "https" else ":80"
    authority = authority.lower().rstrip("/")
    return f"{scheme}://{authority[:-len(default)] if authority.endswith(default) else authority}"


def origin_refusal(origin: str | None, host: str | None, allowed: frozenset[str]) -> str | None:
    """Return why a write's `Origin` is refused, or None.

    Accepted: no Origin (a POS, a script: not a browser page), this agent's own origin
    (`http://` + the request's Host), or an exact entry of `api.allowed_origins`.
    """
    if origin is None:
        return None
    scheme, sep, authority = origin.strip().partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("http", "https"):
        key = _origin_key(scheme, authority)
        if key in allowed:
            return None
        if scheme == "http" and host is not None and key == _origin_key("http", host.strip()):
            return None
    return (f"Origin {origin[:80]!r} is not this agent's own page nor in api.allowed_origins:"
            " a write from another site is refused")


def normalize_origins(origins: Iterable[str]) -> frozenset[str]:
    """The configured `api.allowed_origins`, in the form `origin_refusal` compares."""
    keys = set()
    for origin in origins:
        scheme, _, authority = origin.strip().partition("://")
        keys.add(_origin_key(scheme.lower(), authority))
    return frozenset(keys)


def content_type_refusal(value: str | None) -> str | None:
    """Return why a write's `Content-Type` is refused (only `application/json`, UTF-8), or None."""
    media, _, params = (value or "").partition(";")
    if media.strip().lower() != "application/json":
        given = f"got {value[:80]!r}" if value else "none was given"
        return f"writes need Content-Type: application/json; {given}"
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return f"writes are UTF-8 JSON; Content-Type {value[:80]!r} names another charset"
    return None


class RateLimiter:
    """Token buckets by key (a client's address): `rate` tokens a second, at most `burst` held.

    Time is an argument, so the buckets are exact under a fake clock. `rate == 0` turns
    the limit off. At most `max_keys` buckets are kept: a full bucket is the same as a new
    one and goes first, then the least recently used.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_TRACKED_CLIENTS):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a token (0.0: it has one now); takes nothing."""
        if self.rate <= 0:
            return 0.0
        level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: 0.0 when taken, else the seconds until one is there (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        level = self._level(key, now)
        if level < 1:
            return (1 - level) / self.rate
        self._buckets.pop(key, None)
        self._buckets[key] = (level - 1, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


# ------------------------------------------------------------------ the middleware

class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, limit: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers, self.limit, self.close = headers, limit, close


class RequestGuard:
    """The API's outermost middleware; see the module docstring for what it refuses."""

    def __init__(self, api: "ApiSection", host_names: Iterable[str], metrics: "Metrics | None" = None,
                 connections: "ConnectionTable | None" = None, clock: Callable[[], float] = time.monotonic,
                 authorize: Callable[[web.Request], None] | None = None):
        self.hosts = frozenset(name.lower().rstrip(".") for name in host_names)
        self.origins = normalize_origins(api.allowed_origins)
        self.writes = RateLimiter(api.write_rate_per_s, api.write_burst)
        self.auth_failures = RateLimiter(api.auth_fail_rate_per_s, api.auth_fail_burst)
        self.metrics = metrics
        self.connections = connections
        self.clock = clock
        self.authorize = authorize
        self.body_timeout_s = api.body_timeout_s
        self._quiet = LogLimiter(LOG_INTERVAL_S)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Refuse what the module docstring lists; pass the rest on and watch its authorization."""
        conn = self.connections.request_started(request.transport) if self.connections else None
        try:
            write = request.method not in SAFE_METHODS and request.match_info.route.resource is not None
            peer = request.remote or "?"
            try:
                self._check(request, write, peer)
                if write:
                    await self._authorize_and_read(request, peer)
            except Refusal as refusal:
                return self._refuse(request, peer, refusal)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                answer = from_http_exception(exc, request.method, request.path)   # e.g. 413 on a chunked body
                return self._refuse(request, peer, Refusal(exc.status, answer[ERROR_CODE], exc.reason), answer)
            return await handler(request)
        finally:
            if conn is not None:
                self.connections.request_finished(conn)

    def _check(self, request: web.Request, write: bool, peer: str) -> None:
        headers = request.headers
        host = headers.get("Host")
        why = host_refusal(host, self.hosts)
        if why:
            raise Refusal(421, "misdirected", why, "Host")
        if not write:
            return
        why = origin_refusal(headers.get("Origin"), host, self.origins)
        if why:
            raise Refusal(403, "cross_origin", why, "Origin")
        now = self.clock()
        wait = self.auth_failures.wait(peer, now)
        if wait > 0:
            raise Refusal(429, "rate_limited",
                          f"too many failed authorizations from {peer}: retry in {_retry_after(wait)} s",
                          headers={"Retry-After": _retry_after(wait)}, limit="auth")
        wait = self.writes.take(peer, now)
        if wait > 0:
            raise Refusal(429, "rate_limited",
                          f"too many writes from {peer}: at most {self.writes.rate:g}/s"
                          f" (burst {self.writes.burst}); retry in {_retry_after(wait)} s",
                          headers={"Retry-After": _retry_after(wait)}, limit="write")
        why = content_type_refusal(headers.get("Content-Type"))
        if why:
            raise Refusal(415, "unsupported_media_type", why, "Content-Type")

    async def _authorize_and_read(self, request: web.Request, peer: str) -> None:
        """Check the token (a failure spends the client's failure budget), then read the body
        within body_timeout_s: a client trickling its body cannot hold a busy slot for ever.

        The token comes first, so no body is ever buffered for a client without one.
        """
        if self.authorize is not None:
            try:
                self.authorize(request)
            except ApiError as exc:
                self.auth_failures.take(peer, self.clock())
                raise Refusal(exc.status, exc.code, exc.message, exc.field, exc.headers) from None
        if not request.body_exists or (request.content_length or 0) > MAX_BODY:
            return   # nothing to read, or the handler answers 413 without reading
        try:
            async with asyncio.timeout(self.body_timeout_s):
                await request.read()   # aiohttp keeps it: the handler's read() returns the same bytes
        except TimeoutError:
            raise Refusal(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s"
                          " (api.body_timeout_s)", close=True) from None

    def _refuse(self, request: web.Request, peer: str, refusal: Refusal,
                response: web.Response | None = None) -> web.Response:
        if self.metrics is not None:
            self.metrics.count_refusal(refusal.code)
            if refusal.limit is not None:
                self.metrics.count_rate_limited(refusal.limit)
        held = self._quiet.admit(refusal.code, self.clock())
        if held is not None:
            more = f" ({held} more like it since the last report)" if held else ""
            log.info("api: refused %s %s from %s: %d %s: %s%s", request.method, request.path[:200], peer,
                     refusal.status, refusal.code, refusal.message, more)
        if response is not None:
            return response
        response = error_response(refusal.status, refusal.code, refusal.message, refusal.field, refusal.headers)
        if refusal.close:
            response.force_close()
        return response


def _retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
