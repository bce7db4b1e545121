"""The local API's error answers: `{"error": {"code", "message", "field"?}}`.

Every refusal the API gives goes through `error_response`, so the shape, the
content type and the refused-requests metric are the same for all of them.
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


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return msgspec.json.encode({"error": error})


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """Return the contract's error answer."""
    response = web.Response(status=status, body=error_body(code, message, field),
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
