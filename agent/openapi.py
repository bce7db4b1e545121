"""The OpenAPI 3.1 document of the local API, generated from the msgspec types.

Request and event schemas come from agent.events (the same Structs that decode the
requests); the answer types below describe what the handlers return. The paths are
built from the API's route list, so a route cannot exist without being documented
(tests/api/test_openapi.py checks both ways).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Iterable, Literal

import msgspec

from agent import events as ev

TITLE = "Store Edge Agent local API"
VERSION = "1"


_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET


class ErrorDetail(msgspec.Struct):
    """`sales_cap_reached` adds the cap (sku ... left); `lease_expired` the reservation and its end."""

    code: str
    message: str
    field: str | _Unset = _UNSET
    sku: str | _Unset = _UNSET
    limit: int | _Unset = _UNSET
    period: Literal["day", "week", "month"] | _Unset = _UNSET
    period_start: str | _Unset = _UNSET
    period_end: str | _Unset = _UNSET
    scope: Literal["store", "chain"] | _Unset = _UNSET
    allowance: int | _Unset = _UNSET
    left: int | _Unset = _UNSET
    reservation_id: str | _Unset = _UNSET
    expires_at: str | _Unset = _UNSET


class Error(msgspec.Struct):
    """Every 4xx (and 503/507) answer."""

    error: ErrorDetail


class Health(msgspec.Struct):
    status: Literal["ok"]


class SyncAlarm(msgspec.Struct):
    """Why sync cannot work as configured (e.g. tls_unknown_ca); docs/operations.md lists the codes."""

    code: str
    message: str
    since: str | None


class Ready(msgspec.Struct):
    status: Literal["ready", "not_ready"]
    last_seq: int | msgspec.UnsetType = msgspec.UNSET
    reason: str | msgspec.UnsetType = msgspec.UNSET        # 503 while a sync alarm holds: its code
    alarm: SyncAlarm | msgspec.UnsetType = msgspec.UNSET
    # 503 while writes are fenced (reason rehydrating, awaiting_hub or history_refused)
    message: str | msgspec.UnsetType = msgspec.UNSET
    hub_acked_seq: int | None | msgspec.UnsetType = msgspec.UNSET


class AppendAnswer(msgspec.Struct):
    """201 for a new command, 200 with duplicate=true for a repeat with the same body."""

    command_id: str
    first_seq: int
    last_seq: int
    duplicate: bool


class Stock(msgspec.Struct):
    """With ?as_of=TIME: also `as_of` (as asked) and `as_of_seq`, the last seq the log held then."""

    sku: str
    floor: int
    backroom: int
    reserved: int
    available: Annotated[int, msgspec.Meta(ge=0)]
    last_seq: int
    as_of: str | _Unset = _UNSET
    as_of_seq: int | _Unset = _UNSET


class Here(msgspec.Struct):
    floor: int
    backroom: int
    reserved: int
    available: Annotated[int, msgspec.Meta(ge=0)]


class Nearby(msgspec.Struct):
    store_id: str
    available: int


class SnapshotMeta(msgspec.Struct):
    version: int
    generated_at: str
    age_s: float
    stale: bool


class Source(msgspec.Struct):
    """A hub-configured source listing the SKU; `age_s` from updated_at to the agent's clock."""

    source_id: str
    name: str
    kind: Literal["warehouse", "partner", "supplier"]
    available: Annotated[int, msgspec.Meta(ge=0)]
    lead_time_s: Annotated[int, msgspec.Meta(ge=0)]
    updated_at: str
    age_s: float | None
    stale: bool
    stale_after_s: int | None | _Unset = _UNSET


class CapAnswer(msgspec.Struct):
    """The SKU's sales cap in the period containing now; `used`/`left` counted from the log."""

    limit: int
    scope: Literal["store", "chain"]
    period: Literal["day", "week", "month"]
    period_start: str
    period_end: str
    allowance: int
    used: int
    left: Annotated[int, msgspec.Meta(ge=0)]


class Availability(msgspec.Struct):
    sku: str
    here: Here
    nearby: list[Nearby]
    online: int | None
    snapshot: SnapshotMeta | None
    sources: list[Source]
    cap: CapAnswer | None


class EventsPage(msgspec.Struct):
    """`next_after_seq` is the after_seq of the next page (the last seq of this one)."""

    events: list[ev.AnyEvent]
    next_after_seq: int
    last_seq: int


class SyncStatus(msgspec.Struct):
    last_seq: int
    acked_seq: int
    backlog: int
    connected: bool
    last_ack_at: str | None
    snapshot_version: int | None


_TYPES = (ev.AppendCommand, Error, Health, Ready, AppendAnswer, Stock, Availability, EventsPage, SyncStatus)
_REF = "#/components/schemas/{name}"

_SKU_PARAM = {"name": "sku", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": ev.SKU_PATTERN}}


def _query(name: str, minimum: int, maximum: int | None = None, description: str = "") -> dict:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(name=name)}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict:
    return {str(s): _json("Error", "refused: nothing was changed") for s in statuses}


# Per (method, path): summary, parameters, request body, responses. A route added to the
# app must be documented here (or with `document`) or be listed in PAGES.
_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/healthz"): {"summary": "Liveness: 200 while the process is alive.",
                "responses": {"200": _json("Health", "alive")}},
    ("GET", "/readyz"): {"summary": "Readiness: 200 once the log is open and projections are current.",
               "responses": {"200": _json("Ready", "ready"), "503": _json("Ready", "not ready")}},
    ("POST", "/v1/events"): {
        "summary": "Append a command's events (1 to 1000, all or none); idempotent by command_id.",
        "security": [{"writeToken": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("AppendCommand")}}},
        "responses": {"201": _json("AppendAnswer", "appended"),
                      "200": _json("AppendAnswer", "a repeat of a command already appended: nothing appended"),
                      **_errors(400, 401, 403, 409, 413, 422, 503, 507)}},
    ("GET", "/v1/events"): {
        "summary": "The log in seq order (audit, export).",
        "parameters": [_query("after_seq", 0, None, "return events with seq > after_seq (default 0)"),
                       _query("limit", 1, 1000, "page size (default 100)")],
        "responses": {"200": _json("EventsPage", "a page of events"), **_errors(400)}},
    ("GET", "/v1/stock/{sku}"): {
        "summary": "A SKU's stock; ?as_of_seq=N after events 1..N; ?as_of=TIME as the log stood at TIME.",
        "parameters": [_SKU_PARAM, _query("as_of_seq", 0, None, "time travel: stock after events 1..N"),
                       {"name": "as_of", "in": "query", "required": False,
                        "schema": {"type": "string", "format": "date-time"},
                        "description": "time travel by time (RFC 3339 UTC, not after the agent's clock): the"
                                       " stock after every event before the first one recorded after it;"
                                       " not together with as_of_seq"}],
        "responses": {"200": _json("Stock", "the SKU's stock"), **_errors(400, 404)}},
    ("GET", "/v1/availability/{sku}"): {
        "summary": "The kiosk answer: local stock, nearby stores, online, sources and the sales cap.",
        "parameters": [_SKU_PARAM],
        "responses": {"200": _json("Availability", "availability"), **_errors(400, 404)}},
    ("GET", "/v1/sync"): {"summary": "Sync progress toward the hub.",
                 "responses": {"200": _json("SyncStatus", "sync status")}},
    ("GET", "/metrics"): {"summary": "Prometheus metrics.",
                     "responses": {"200": {"description": "Prometheus text format",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}}},
    ("GET", "/openapi.json"): {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}},
}
# The kiosk's endpoints (agent/kiosk.py).
_OPERATIONS[("GET", "/v1/search")] = {
    "summary": "Products whose SKU or catalog name matches q, exact SKU first.",
    "parameters": [{"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200}},
                   _query("limit", 1, 50, "how many items (default 20)")],
    "responses": {"200": {"description": "matches", "content": {"application/json": {"schema": {
        "type": "object", "required": ["query", "items"],
        "properties": {"query": {"type": "string"}, "items": {"type": "array", "items": {"type": "object"}}}}}}},
        **_errors(400)}}
_OPERATIONS[("GET", "/v1/stream")] = {
    "summary": "Server-sent events: hello, then stock {last_seq, skus} after every commit (never ends).",
    "responses": {"200": {"description": "an event stream",
                          "content": {"text/event-stream": {"schema": {"type": "string"}}}}}}

# Routes that serve HTML pages and their assets, not the JSON API.
PAGES = {("GET", "/"), ("GET", "/kiosk/{name}")}


def document(method: str, path: str, operation: dict[str, Any]) -> None:
    """Document a route another module adds to the API app (summary, parameters, responses)."""
    _OPERATIONS[(method.upper(), path)] = operation


def _operation_id(method: str, path: str) -> str:
    words = "".join(c if c.isalnum() else "_" for c in path).strip("_")
    return f"{method.lower()}_{words}".replace("__", "_")


def _front_door_answers(method: str, responses: dict[str, Any]) -> None:
    """The refusals agent/guard.py gives before any handler: Host on every route; Origin,
    rate limits, Content-Type and the body deadline on writes."""
    responses.setdefault("421", _json("Error", "Host is not one of this agent's names"))
    if method not in ("GET", "HEAD", "OPTIONS"):
        responses.setdefault("403", _json("Error", "cross-site Origin, or a wrong write token"))
        responses.setdefault("408", _json("Error", "the body did not arrive within api.body_timeout_s"))
        responses.setdefault("415", _json("Error", "Content-Type is not application/json"))
        responses.setdefault("429", {**_json("Error", "too many writes or failed authorizations from this client"),
                                     "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                                 "description": "seconds to wait"}}})


def openapi_document(routes: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for `routes` ((method, path) each; PAGES are left out).

    Raises KeyError naming a route that has no documented operation.
    """
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        if (method, path) in PAGES or method == "HEAD":
            continue
        if (method, path) not in _OPERATIONS:
            raise KeyError(f"openapi: {method} {path} is served but not documented (agent/openapi.py)")
        operation = {"operationId": _operation_id(method, path), **copy.deepcopy(_OPERATIONS[(method, path)])}
        if "{sku}" in path or "parameters" in operation:
            # Any path can miss the router (e.g. a SKU with a slash): 404 in the error shape.
            operation["responses"].setdefault("404", _json("Error", "no such endpoint or SKU"))
        _front_door_answers(method, operation["responses"])
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "Errors are {\"error\": {\"code\", \"message\", \"field\"?}} and append nothing."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"writeToken": {"type": "http", "scheme": "bearer",
                                               "description": "api.write_token; needed only when one is set"}},
        },
    }
