"""Fixtures for the availability suite: a private mosquitto per test."""

import pytest

from tests.support.broker import Broker


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path / "broker") as running:
        yield running
