"""Linux process helpers that degrade to nothing elsewhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask Linux for `sig` when the parent dies, even by SIGKILL; exit now if it is already gone.

    The signal follows the parent thread that forked us: the agent starts its children
    from its event loop's (main) thread, which lives as long as the agent.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # not Linux: the agent's clean stop still ends us
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
