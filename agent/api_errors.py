"""The local API's error answers: `{"error": {"code", "message", "field"?}}`, and query parsing.

Every refusal the API gives goes through `error_response`, so the shape, the
content type and the refused-requests metric are the same for all of them.
`only_params` and `int_param` are the one way every GET handler (agent/api.py,
agent/kiosk.py) reads its query string.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

MAX_BODY = 1024 * 1024
# The error code an answer carries, read back by the middleware to count refusals by code.
ERROR_CODE = web.ResponseKey("error_code", str)

# aiohttp's own refusals (no route, wrong method, body too large) -> our codes.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


class ApiError(Exception):
    """A request the API refuses; becomes an error answer with `status`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None, extra: dict | None = None) -> bytes:
    """The error JSON; `extra` adds members after code, message and field (e.g. a cap's limit)."""
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if extra:
        error.update((k, v) for k, v in extra.items() if k not in error)
    return msgspec.json.encode({"error": error})


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, extra: dict | None = None) -> web.Response:
    """Return the contract's error answer."""
    response = web.Response(status=status, body=error_body(code, message, field, extra),
                            content_type="application/json", headers=headers)
    response[ERROR_CODE] = code
    return response


def from_http_exception(exc: web.HTTPException, method: str, path: str) -> web.Response:
    """Turn one of aiohttp's own refusals into the contract's error shape."""
    status = exc.status
    code = HTTP_CODES.get(status, "bad_request" if status < 500 else "internal")
    if status == 404:
        message = f"no such endpoint: {method} {path}"
    elif status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        message = f"{method} is not allowed on {path} (allowed: {allowed})"
    elif status == 413:
        message = f"request body is over the limit of {MAX_BODY} bytes (1 MiB)"
    else:
        message = exc.reason or code
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
    return error_response(status, code, message, headers=headers or None)


def only_params(query, *allowed: str) -> None:
    """Refuse a query parameter the endpoint does not take, or one given twice: 400 naming it.

    An ignored parameter would answer something else than was asked (`?as_of=` on
    /v1/stock/{sku} answered the current stock as if it were the past).
    """
    for name in query:
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no query parameters"
            raise ApiError(400, "invalid", f"unknown query parameter {name[:40]!r}: this endpoint {takes}", name[:64])
        if len(query.getall(name)) > 1:
            raise ApiError(400, "invalid", f"query parameter {name} is given more than once", name)


def int_param(name: str, raw: str, low: int, high: int | None = None) -> int:
    """Parse a query parameter as a decimal integer in [low, high]; ApiError naming it otherwise."""
    # ASCII digits only (str.isdigit also takes "²", which int() refuses); 18 digits keep the
    # value inside SQLite's 64-bit integers and int()'s digit limit.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, "invalid", f"{name} must be a non-negative integer, got {raw[:40]!r}", name)
    value = int(raw)
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f">= {low}"
        raise ApiError(400, "invalid", f"{name} must be {bound}, got {value}", name)
    return value
