"""A fresh PostgreSQL database per test on the local cluster (`pg_url` fixture).

The cluster: $EDGE_TEST_PG_DSN, else postgresql://postgres@127.0.0.1:5432/postgres
(scripts/test starts an installed, stopped cluster). Each test gets a database created
from template0 and dropped afterwards (WITH (FORCE): a test's leftover connections go
too). When the cluster cannot be reached the test is skipped, and fails with CI=true.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

import pytest

ADMIN_DSN = os.environ.get("EDGE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    import psycopg

    from tests.conftest import unavailable

    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {ADMIN_DSN} ({str(exc).strip()[:200]}); scripts/test starts"
                    " an installed cluster (Debian: apt-get install postgresql), or set EDGE_TEST_PG_DSN")


def url_for(dbname: str) -> str:
    """A postgresql:// url for `dbname` on the test cluster (the form `storage.url` takes)."""
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(ADMIN_DSN)
    user = quote(str(info.get("user", "postgres")), safe="")
    password = f":{quote(str(info['password']), safe='')}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    host = quote(str(host), safe="") if str(host).startswith("/") else host
    return f"postgresql://{user}{password}@{host}:{info.get('port', 5432)}/{dbname}"


@pytest.fixture
def pg_url():
    """The url of a new, empty database (dropped after the test)."""
    name = f"edge_test_{os.getpid()}_{secrets.token_hex(4)}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield url_for(name)
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
