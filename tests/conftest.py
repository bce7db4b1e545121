"""Suite-wide settings (in CI a missing service is a failure, never a skip) and shared fixtures."""

import os
import shutil

import pytest

from agent import events as ev

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytest_plugins = ["tests.support.pg"]   # the `pg_url` fixture: a fresh PostgreSQL database per test


def unavailable(message: str) -> None:
    """A test's prerequisite is missing: fail in CI, skip with the reason elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """Return the path of a required binary; fail in CI, skip with a reason elsewhere."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    unavailable(f"{name} is not installed (Debian: apt-get install {name}); scripts/test installs it")


@pytest.fixture
def received_v2_with_v1_upcaster(monkeypatch):
    """A test-only schema history: `received` v1 called the quantity `quantity`; v2 calls it `qty`.

    The current Struct plays v2 here: the current schema for `received` is raised to 2 and
    an upcaster registered for v1 -> v2.
    """
    monkeypatch.setitem(ev._CURRENT, "received", 2)

    @ev.upcaster("received", 1)
    def rename_quantity(data):
        data["qty"] = data.pop("quantity")
        data["schema"] = 2
        return data

    yield
    ev.unregister_upcaster("received", 1)
