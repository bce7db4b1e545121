"""Fixtures for the hub's PostgreSQL tests: a fresh database per test on the local cluster."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.conftest import unavailable

ADMIN_URL = os.environ.get("EDGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (uv sync)")
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}"
                    " (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)")


@pytest.fixture
def pg_url():
    """A new, empty database (from template0) for one test; dropped afterwards."""
    admin = _admin()
    name = f"edge_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_admin():
    admin = _admin()
    yield admin
    admin.close()
