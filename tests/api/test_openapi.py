"""GET /openapi.json: an OpenAPI 3.1 document that covers every route, generated from the types."""

from __future__ import annotations

import schemathesis

from agent import events as ev
from agent.api import build_app
from agent.openapi import PAGES


async def test_openapi_covers_every_route_and_nothing_else(agent):
    status, doc = await agent.get("/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {(route.method, route.resource.canonical) for route in build_app(agent.ctx).router.routes()
              if route.method != "HEAD"}
    assert served - PAGES == documented
    contract = {("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/events"), ("GET", "/v1/stock/{sku}"),
                ("GET", "/v1/availability/{sku}"), ("GET", "/v1/events"), ("GET", "/v1/sync"), ("GET", "/metrics")}
    assert contract <= documented


async def test_openapi_schemas_come_from_the_msgspec_types(agent):
    _, doc = await agent.get("/openapi.json")
    schemas = doc["components"]["schemas"]
    for struct in (ev.Receive, ev.Sell, ev.Move, ev.Count, ev.Adjust, ev.Reserve, ev.AppendCommand, ev.Sold):
        assert struct.__name__ in schemas, struct
    receive = schemas["Receive"]["properties"]
    assert receive["qty"] == {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                              "description": "integer, 1 to 1,000,000"}
    assert schemas["AppendCommand"]["properties"]["events"]["maxItems"] == 1000
    assert "from" in schemas["Move"]["properties"]
    post = doc["paths"]["/v1/events"]["post"]
    assert {"200", "201", "400", "401", "403", "409", "413", "422"} <= set(post["responses"])


async def test_openapi_document_loads_in_schemathesis(agent):
    _, doc = await agent.get("/openapi.json")
    schema = schemathesis.openapi.from_dict(doc)
    operations = {op.ok().label for op in schema.get_all_operations()}
    assert "POST /v1/events" in operations and "GET /v1/stock/{sku}" in operations
