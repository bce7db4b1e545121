"""Helpers for the agent's worker processes (the snapshot apply worker, the sync worker).

Linux-only calls that degrade to nothing elsewhere: die with the agent, run at
background priority, carry a name that `ps` and `top` show.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

BACKGROUND_NICE = 10   # where SCHED_IDLE is not available


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a worker process: ask Linux for `sig` when the agent dies, even by SIGKILL.

    Call it in the worker. The workers are created from the event loop's (main) thread,
    which lives as long as the agent, so the signal fires when the agent process ends,
    not earlier.
    """
    try:
        _libc().prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the agent's clean stop still ends us
        return
    if os.getppid() != parent_pid:  # the agent died before prctl took effect
        os._exit(0)


def lower_priority(pid: int = 0) -> bool:
    """Put a thread (0: the calling one) under SCHED_IDLE, else at nice BACKGROUND_NICE.

    Threads it starts later inherit it. SCHED_IDLE: a waking normal task (the API's event
    loop, a kiosk) is preferred at once; at a nice level the scheduler may first let the
    running task finish its slice. Lowering needs no privilege. Returns True when done.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, pid, BACKGROUND_NICE)
        return True
    except (OSError, AttributeError):
        return False


_POLICIES = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, n)}


def realtime_main_thread() -> str:
    """Describe the calling (main) thread's scheduling, and keep a real-time one to itself.

    The shipped unit starts the agent under SCHED_RR priority 1 (CPUSchedulingPolicy=rr):
    the event loop, which serves every kiosk request, then preempts any ordinary task on
    the box at once, where under SCHED_OTHER Linux's EEVDF scheduler may first run a
    background task's earned lag (measured: up to 3.5 ms, docs/benchmarks.md). Threads and
    processes started afterwards must not inherit it (the log's writer thread, the
    sync worker): when the unit's CPUSchedulingResetOnFork=yes is missing (`chrt -r 1`
    by hand), set the reset-on-fork flag here. Call it before any thread starts.
    Returns e.g. "SCHED_RR priority 1" or "SCHED_OTHER".
    """
    try:
        raw = os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return "unknown"
    reset = getattr(os, "SCHED_RESET_ON_FORK", 0)
    policy = raw & ~reset
    name = _POLICIES.get(policy, str(policy))
    if policy not in (getattr(os, "SCHED_FIFO", -1), getattr(os, "SCHED_RR", -1)):
        return name
    priority = os.sched_getparam(0).sched_priority
    if reset and not raw & reset:
        try:
            os.sched_setscheduler(0, policy | reset, os.sched_param(priority))
        except OSError as exc:
            return f"{name} priority {priority} (inherited by its threads: reset-on-fork refused: {exc})"
    return f"{name} priority {priority}"


def set_thread_name(name: str) -> None:
    """Name the calling thread (up to 15 bytes) for ps, top and the journal."""
    try:
        _libc().prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3   # glibc's malloc.h


def return_freed_memory(mmap_threshold: int | None = None) -> bool:
    """glibc only: give freed heap memory back to the system (malloc_trim).

    With `mmap_threshold`, also fix the size from which allocations are mmapped (and so
    returned to the system as soon as they are freed) instead of glibc's sliding one,
    which rises to the largest block freed and keeps later ones of that size in the heap.
    Returns True when glibc took it; elsewhere it does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        if mmap_threshold is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        return libc.malloc_trim(0) in (0, 1)
    except (OSError, AttributeError):
        return False
