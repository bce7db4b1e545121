"""Crash points for the fault-injection tests: `point(name)` SIGKILLs its own process.

Test builds only. A store never sets these variables; without EDGE_FAULT_POINT
`point` is a function that does nothing (the environment is read once, at import).

- EDGE_FAULT_POINT=NAME[:N]  the Nth time (default 1) the process passes `point("NAME")`
  it kills itself with SIGKILL: no cleanup, no reply, no flush, as a power cut or an OOM
  kill would leave it;
- EDGE_FAULT_MARK=PATH  (optional) fire only if PATH does not exist, and create it just
  before the kill, so the restarted process (same environment) runs on unharmed.

The points (tests/faults/test_fault_points.py):
  agent.after_commit    agent/api.py: the command is committed to the log, the HTTP reply not sent;
  sync.after_publish    sync/uplink.py: the broker has a batch (PUBACK), the hub's ack not received;
  sync.before_cursor_save  sync/uplink.py: the hub's ack received, the cursor not yet saved.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("EDGE_FAULT_POINT", "")


def _noop(name: str) -> None:
    return None


def _armed(target: str, count: int, mark: str):
    passes = 0

    def point(name: str) -> None:
        nonlocal passes
        if name != target:
            return
        passes += 1
        if passes < count:
            return
        if mark:
            try:
                os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)

    return point


if _SPEC:
    _name, _, _count = _SPEC.partition(":")
    _mark = os.environ.get("EDGE_FAULT_MARK", "")
    point = _noop if (_mark and os.path.exists(_mark)) else _armed(_name, int(_count or 1), _mark)
else:
    point = _noop
