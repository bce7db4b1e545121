"""Fixtures for the hub's tests: `pg_url` (a fresh PostgreSQL database, tests/support/pg.py),
an admin connection to the same cluster, and a private mosquitto."""

from __future__ import annotations

import pytest


@pytest.fixture
def pg_admin():
    """An autocommit connection to the test cluster's admin database (pg_terminate_backend and the like)."""
    from tests.support.pg import _admin

    admin = _admin()
    yield admin
    admin.close()


@pytest.fixture
def broker(tmp_path):
    from tests.support.broker import Broker

    with Broker(tmp_path / "broker") as running:
        yield running
