"""Property-based conformance: schemathesis against GET /openapi.json of a real `edge-agent run`.

Positive and negative data for every documented operation (the never-ending event
stream excepted): no 5xx, status codes, content types and bodies as documented, schema-
invalid requests refused, and the log's length unchanged after every refused request.
The agent has a write token, and its front door (agent/guard.py) is on: the Host
schemathesis sends (the agent's loopback address) is served, a write whose Content-Type
is not JSON is refused with 415, and a generated bearer token becomes the real one.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from agent.reader import LogReader
from tests.support.agentproc import AgentProcess

EXAMPLES = 40
TOKEN = "schemathesis-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def st_agent(tmp_path_factory):
    # Generated unauthorized writes are many: a failed-authorization budget that lasts the
    # run keeps them 401/403 (the 429 after it is tested in tests/security/test_api_hardening.py).
    agent = AgentProcess(tmp_path_factory.mktemp("schemathesis"), write_token=TOKEN,
                         sections={"api": {"auth_fail_burst": 100_000, "write_burst": 100_000}})
    agent.start()
    # Some stock, so reads of common SKUs and reservations have something to find.
    status, _ = agent.request("POST", "/v1/events", {"command_id": "seed", "events": [
        {"type": "received", "sku": s, "qty": 50, "location": "floor"} for s in ("A", "0", "A1", "SKU-1")]})
    assert status == 201
    yield agent
    assert agent.terminate() == 0, agent.output()[-2000:]


@pytest.fixture(scope="module")
def log_reader(st_agent):
    reader = LogReader(st_agent.db_path)
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def api_schema(st_agent):
    return schemathesis.openapi.from_url(st_agent.url + "/openapi.json").exclude(path="/v1/stream")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' own pytest integration (from_fixture) breaks on pytest 9, so each
# operation and mode runs as a plain hypothesis test over the operation's strategy.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_api_conforms_to_its_openapi_document(api_schema, log_reader, mode):
    ops = operations(api_schema)
    assert len(ops) >= 9
    statuses: dict[str, set[int]] = {}
    for operation in ops:
        if mode == GenerationMode.NEGATIVE and not _has_inputs(operation):
            continue  # nothing to make invalid

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            # A generated bearer token stands for "authorized": use the real one. A missing
            # or malformed Authorization is left as generated and must be refused.
            if (case.headers or {}).get("Authorization", "").startswith("Bearer "):
                case.headers["Authorization"] = f"Bearer {TOKEN}"
            before = log_reader.last_seq()
            response = case.call_and_validate(checks=CHECKS, timeout=10)
            statuses.setdefault(f"{case.method} {case.operation.path}", set()).add(response.status_code)
            assert response.status_code != 421, f"the agent refused its own Host: {response.text}"
            if response.status_code == 415:
                assert not (case.media_type or "").startswith("application/json"), response.text
            if case.method == "POST" and response.status_code in (200, 201):
                assert (case.media_type or "").startswith("application/json"), case.media_type
            if response.status_code >= 400:
                assert log_reader.last_seq() == before, (
                    f"{case.method} {case.path} was refused with {response.status_code} but the log grew "
                    f"from {before} to {log_reader.last_seq()}")

        check()

    # The generated data reached the handlers, not only the refusals in front of them.
    if mode == GenerationMode.POSITIVE:
        assert 201 in statuses["POST /v1/events"], statuses
        assert 200 in statuses["GET /v1/stock/{sku}"], statuses
    else:
        assert {422, 401} <= statuses["POST /v1/events"], statuses


def _has_inputs(operation) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))
