"""The systemd units pass `systemd-analyze verify` cleanly and score 2.0 or better on security."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
UNITS = ["edge-agent.service", "edge-hub.service"]


def _installed_copy(unit: str, tmp_path: Path) -> Path:
    """Copy the unit with ExecStart pointing at this environment's console script.

    verify checks that ExecStart's binary exists; on a store PC it is
    /usr/local/bin/edge-*, here it is the virtualenv's.
    """
    binary = unit.split(".")[0]
    script = Path(sys.executable).parent / binary
    assert script.exists(), f"{script} missing: run uv sync"
    text = (ROOT / "systemd" / unit).read_text()
    assert f"ExecStart=/usr/local/bin/{binary} " in text
    copy = tmp_path / unit
    copy.write_text(text.replace(f"/usr/local/bin/{binary}", str(script)))
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_warnings(unit, tmp_path):
    tool = require_binary("systemd-analyze")
    copy = _installed_copy(unit, tmp_path)
    done = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_security_exposure_is_at_most_2(unit, tmp_path):
    tool = require_binary("systemd-analyze")
    copy = _installed_copy(unit, tmp_path)
    done = subprocess.run([tool, "security", "--offline=yes", "--threshold=20", str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert score and float(score.group(1)) <= 2.0, done.stdout[-500:]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_service_contract(unit):
    text = (ROOT / "systemd" / unit).read_text()
    for line in ("Type=notify", "Restart=on-failure", "DynamicUser=yes", "NotifyAccess=main"):
        assert line in text.splitlines(), line
    for key in ("WatchdogSec=", "StateDirectory=", "ConfigurationDirectory=", "LoadCredential=mqtt-password:"):
        assert any(l.startswith(key) for l in text.splitlines()), key
