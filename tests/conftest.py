"""Suite-wide settings: in CI a missing service is a failure, never a skip."""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """Return the path of a required binary; fail in CI, skip with a reason elsewhere."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    message = f"{name} is not installed (Debian: apt-get install {name}); scripts/test installs it"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
