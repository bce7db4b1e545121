"""The shell's clock and id source (the domain core never calls these itself)."""

from __future__ import annotations

import functools
import math
import os
import random
import threading
import time
from datetime import datetime


def rfc3339(ts: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds, e.g. 2026-11-27T13:05:00.123Z."""
    # Rounded to the microsecond first, as datetime.fromtimestamp does.
    frac, whole = math.modf(ts)
    sec, micro = int(whole), round(frac * 1e6)
    if micro >= 1_000_000:
        sec, micro = sec + 1, micro - 1_000_000
    elif micro < 0:
        sec, micro = sec - 1, micro + 1_000_000
    return f"{_second(sec)}.{micro // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(sec: int) -> str:
    # Appends in one second share this prefix: formatting it through datetime each time
    # cost more than the rest of a one-event append's Python.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


def utc_now() -> str:
    """Return the current time as an RFC 3339 UTC string."""
    return rfc3339(time.time())


def parse_rfc3339(text: str) -> float:
    """Return the Unix time of an RFC 3339 string; raises ValueError when it is not one."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Uuid7:
    """Time-ordered UUIDs (RFC 9562 version 7), monotonic within this process.

    Time-ordered ids keep the unique index on event ids append-mostly: random uuid4
    keys halve batched insert speed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        # Uniqueness comes from the time and counter; the random bits need no crypto strength.
        self._random = random.Random(os.urandom(16))

    def __call__(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
                self._counter += 1
                if self._counter > 0xFFF:
                    ms += 1
                    self._counter = 0
            else:
                self._counter = self._random.getrandbits(10)
            self._last_ms = ms
            counter = self._counter
        rand = self._random.getrandbits(62)
        # 48-bit ms, version 7 + 12-bit counter, variant 0b10 + 62 random bits.
        return "%08x-%04x-%04x-%04x-%012x" % (
            ms >> 16, ms & 0xFFFF, 0x7000 | counter, 0x8000 | rand >> 48, rand & 0xFFFFFFFFFFFF)


new_event_id = Uuid7()


class ShiftedClock:
    """A test-only clock: time.time() plus the offset in seconds written in a file.

    Only for tests of clock jumps against a running process (EDGE_AGENT_TEST_CLOCK_OFFSET_FILE,
    agent/settings.py); a store never sets it. The file is re-read when it changes (one
    stat a call), so a test moves the clock of a running agent by rewriting it. A missing
    or unreadable file means offset 0.
    """

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int] | None = None
        self.offset = 0.0

    def __call__(self) -> float:
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size)
            if key != self._seen:
                with open(self.path) as fh:
                    self.offset = float(fh.read().strip() or 0)
                self._seen = key
        except (OSError, ValueError):
            self.offset, self._seen = 0.0, None
        return time.time() + self.offset
