"""The shell's clock and id source (the domain core never calls these itself)."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import datetime, timezone


def rfc3339(ts: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds, e.g. 2026-11-27T13:05:00.123Z."""
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


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
        rand = self._random.getrandbits(62) | (1 << 63)
        h = "%012x7%03x%016x" % (ms, counter, rand)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_event_id = Uuid7()
