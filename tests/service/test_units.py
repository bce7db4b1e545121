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


def _security(unit: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze security --offline=true` on the installed copy (exit 1 above 2.0)."""
    tool = require_binary("systemd-analyze")
    copy = _installed_copy(unit, tmp_path)
    return subprocess.run([tool, "security", "--offline=true", "--threshold=20", str(copy)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_security_exposure_is_at_most_2(unit, tmp_path):
    done = _security(unit, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert score, done.stdout[-500:]
    assert float(score.group(1)) <= 2.0, done.stdout[-500:]


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_sees_realtime_scheduling_restricted(unit, tmp_path):
    done = _security(unit, tmp_path)
    lines = [l for l in done.stdout.splitlines() if "RestrictRealtime=" in l]
    assert lines and lines[0].lstrip().startswith("✓"), done.stdout[-3000:]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_service_contract(unit):
    text = (ROOT / "systemd" / unit).read_text()
    for line in ("Type=notify", "Restart=on-failure", "DynamicUser=yes", "NotifyAccess=main"):
        assert line in text.splitlines(), line
    for key in ("WatchdogSec=", "StateDirectory=", "ConfigurationDirectory=", "LoadCredential=mqtt-password:"):
        assert any(l.startswith(key) for l in text.splitlines()), key


def _effective_syscalls(unit: str, tool: str) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow, in systemd's order:
    the first (allow-list) line sets the list, `~` lines remove, later plain lines add."""
    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        out = subprocess.run([tool, "syscall-filter", name], capture_output=True, text=True, timeout=60).stdout
        members = [line.strip() for line in out.splitlines()[1:]]
        return set().union(*(expand(m) for m in members if m and not m.startswith("#")))

    allowed: set[str] = set()
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            names = set().union(*(expand(n) for n in value.lstrip("~").split()))
            allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def test_agent_unit_lets_the_agent_renice_its_sync_child_only():
    """The agent starts `edge-agent sync` `sync.nice` steps nicer (agent/supervisor.py): the unit
    allows setpriority while the rest of @resources, sched_setscheduler included, stays denied."""
    tool = require_binary("systemd-analyze")
    allowed = _effective_syscalls("edge-agent.service", tool)
    assert "setpriority" in allowed
    assert not {"sched_setscheduler", "sched_setaffinity", "setrlimit"} & allowed
    assert {"clone", "execve", "prctl", "wait4"} <= allowed


def test_no_unit_uses_realtime_scheduling():
    """Scheduling is the kernel's: no real-time class, and no way for the process to take one."""
    for unit in UNITS:
        lines = (ROOT / "systemd" / unit).read_text().splitlines()
        assert not [l for l in lines if l.startswith(("CPUScheduling", "LimitRTPRIO"))], unit
        assert "RestrictRealtime=yes" in lines, unit
        assert "CapabilityBoundingSet=" in lines, unit


def test_agent_unit_starts_the_agent_as_the_tests_do():
    lines = (ROOT / "systemd" / "edge-agent.service").read_text().splitlines()
    assert "ExecStart=/usr/local/bin/edge-agent run --config /etc/edge-agent/agent.toml" in lines
    assert "Environment=MALLOC_ARENA_MAX=2" in lines


def test_agent_unit_allows_more_open_files_than_the_api_can_hold():
    """The API holds at most max_connections plus two accept bursts (agent/connections.py); systemd's
    default soft limit of 1024 would make the agent lower its cap, so the unit raises it."""
    from agent.connections import FD_RESERVE, connection_budget
    from agent.server import LISTEN_BACKLOG
    from agent.settings import ApiSection

    lines = (ROOT / "systemd" / "edge-agent.service").read_text().splitlines()
    limits = [int(l.split("=", 1)[1]) for l in lines if l.startswith("LimitNOFILE=")]
    assert len(limits) == 1, limits
    cap = ApiSection().max_connections
    assert cap + 2 * LISTEN_BACKLOG + FD_RESERVE <= limits[0]
    assert connection_budget(cap, LISTEN_BACKLOG, limits[0]) == (cap, LISTEN_BACKLOG)


def test_agent_unit_hands_over_the_write_token_as_a_credential():
    lines = (ROOT / "systemd" / "edge-agent.service").read_text().splitlines()
    assert "LoadCredential=write_token:/etc/edge-agent/write_token" in lines
    from agent.settings import WRITE_TOKEN_CREDENTIAL
    assert WRITE_TOKEN_CREDENTIAL == "write_token"
