"""Ctrl-C stops the demo at once, even while its prompt waits for a line that never comes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support.procs import processes_under
from tests.sync.helpers import wait_until

STOP_WITHIN_S = 5.0


def _stdin(kind: str) -> tuple[int, int]:
    """(the demo's end, the end this test keeps open): a pipe, or a terminal (a pty)."""
    if kind == "pipe":
        read_end, write_end = os.pipe()
        return read_end, write_end
    controller, terminal = os.openpty()
    return terminal, controller


@pytest.mark.parametrize("kind", ["pipe", "tty"])
def test_sigint_exits_0_at_once_while_the_prompt_waits(kind, tmp_path):
    require_binary("mosquitto")
    state = tmp_path / "demo"
    out = tmp_path / "demo.out"
    theirs, ours = _stdin(kind)
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "demo", "--state-dir", str(state), "--rate", "5", "--products", "20",
             "--stores", "1", "--port-base", "0", "--status-every", "0"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=theirs)
    os.close(theirs)
    try:
        wait_until(lambda: "Ctrl-C stops" in out.read_text() or proc.poll() is not None, 60, "the demo's banner")
        assert proc.poll() is None, out.read_text()
        # A command answered proves the prompt is live; then half a line, and nothing more.
        os.write(ours, b"help\n")
        wait_until(lambda: "commands: down STORE" in out.read_text(), 10, "the prompt's answer")
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] for pid in processes_under(state)]
        # The agent is started as its unit starts it: `edge-agent run --config F`.
        assert [b"edge-agent", b"run", b"--config", str(state / "store-1.toml").encode()] in [
            [Path(c[-4].decode()).name.encode(), *c[-3:]] for c in commands if len(c) >= 4], commands
        os.write(ours, b"dow")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo still runs {STOP_WITHIN_S:g}s after SIGINT:\n{out.read_text()[-3000:]}")
        assert code == 0, out.read_text()[-3000:]
        assert time.monotonic() - started < STOP_WITHIN_S
        assert out.read_text().rstrip().endswith("demo: stopped"), out.read_text()[-3000:]
        assert [pid for pid in processes_under(state) if Path(f"/proc/{pid}").exists()] == []
    finally:
        os.close(ours)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes_under(state):
            os.kill(pid, signal.SIGKILL)
