"""Rate-limited logging of the hub's refusals: one store can send any number of bad messages.

Every refusal is still counted (`HubService.counters`, the `rejections` table); the log
gets at most one WARNING per (store, reason) per `interval_s`, and the next one says how
many were left out meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


class RefusalLog:
    """Log refusals at most once per (store, reason) per `interval_s`, counting the rest."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval_s
        self._monotonic = monotonic
        self._next: dict[tuple[str | None, str], float] = {}   # key -> when the next line may go out
        self._held: dict[tuple[str | None, str], int] = {}     # key -> refusals not logged since

    def refused(self, store_id: str | None, reason: str, topic: str, detail: str) -> bool:
        """Record one refusal; return True when it was logged (False: counted toward the next line)."""
        key = (store_id, reason)
        now = self._monotonic()
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._next[key] = now + self._interval
        more = f" ({held} more refused for this store and reason in the last {self._interval:g} s)" if held else ""
        self._log.warning("hub: refused a message on %s (%s): %s%s", topic, reason, detail[:300], more)
        return True
