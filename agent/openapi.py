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


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    field: str | msgspec.UnsetType = msgspec.UNSET


class Error(msgspec.Struct):
    """Every 4xx (and 503/507) answer."""

    error: ErrorDetail


class Health(msgspec.Struct):
    status: Literal["ok"]


class Ready(msgspec.Struct):
    status: Literal["ready", "not_ready"]
    last_seq: int | msgspec.UnsetType = msgspec.UNSET


class AppendAnswer(msgspec.Struct):
    """201 for a new command, 200 with duplicate=true for a repeat with the same body."""

    command_id: str
    first_seq: int
    last_seq: int
    duplicate: bool


class Stock(msgspec.Struct):
    sku: str
    floor: int
    backroom: int
    reserved: int
    available: Annotated[int, msgspec.Meta(ge=0)]
    last_seq: int


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


class Availability(msgspec.Struct):
    sku: str
    here: Here
    nearby: list[Nearby]
    online: int | None
    snapshot: SnapshotMeta | None


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


# Per handler name: summary, parameters, request body, responses.
_OPERATIONS: dict[str, dict[str, Any]] = {
    "healthz": {"summary": "Liveness: 200 while the process is alive.",
                "responses": {"200": _json("Health", "alive")}},
    "readyz": {"summary": "Readiness: 200 once the log is open and projections are current.",
               "responses": {"200": _json("Ready", "ready"), "503": _json("Ready", "not ready")}},
    "post_events": {
        "summary": "Append a command's events (1 to 1000, all or none); idempotent by command_id.",
        "security": [{"writeToken": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("AppendCommand")}}},
        "responses": {"201": _json("AppendAnswer", "appended"),
                      "200": _json("AppendAnswer", "a repeat of a command already appended: nothing appended"),
                      **_errors(400, 401, 403, 409, 413, 422, 503, 507)}},
    "get_events": {
        "summary": "The log in seq order (audit, export).",
        "parameters": [_query("after_seq", 0, None, "return events with seq > after_seq (default 0)"),
                       _query("limit", 1, 1000, "page size (default 100)")],
        "responses": {"200": _json("EventsPage", "a page of events"), **_errors(400)}},
    "get_stock": {
        "summary": "A SKU's stock; ?as_of_seq=N answers the stock after events 1..N.",
        "parameters": [_SKU_PARAM, _query("as_of_seq", 0, None, "time travel: stock after events 1..N")],
        "responses": {"200": _json("Stock", "the SKU's stock"), **_errors(400, 404)}},
    "get_availability": {
        "summary": "The kiosk answer: local stock plus nearby stores and online from the latest snapshot.",
        "parameters": [_SKU_PARAM],
        "responses": {"200": _json("Availability", "availability"), **_errors(400, 404)}},
    "get_sync": {"summary": "Sync progress toward the hub.",
                 "responses": {"200": _json("SyncStatus", "sync status")}},
    "metrics_text": {"summary": "Prometheus metrics.",
                     "responses": {"200": {"description": "Prometheus text format",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}}},
    "openapi": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}},
}


def openapi_document(routes: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for `routes` ((method, path, handler name) each).

    Raises KeyError naming a handler that has no documented operation.
    """
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, name in routes:
        operation = {"operationId": name, **copy.deepcopy(_OPERATIONS[name])}
        if "{sku}" in path or "parameters" in operation:
            # Any path can miss the router (e.g. a SKU with a slash): 404 in the error shape.
            operation["responses"].setdefault("404", _json("Error", "no such endpoint or SKU"))
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
