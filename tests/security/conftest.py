"""Fixtures for the bad-input suite: a private mosquitto per test that needs one."""

import pytest

from tests.support.broker import Broker


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path / "broker") as running:
        yield running


# The API suite's real agent (serve() on a free loopback port), for the HTTP bad-input tests.
from tests.api.conftest import agent, start_agent  # noqa: E402,F401
