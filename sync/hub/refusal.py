"""Rate-limited logging of the hub's refusals: one store can send any number of bad messages.

Every refusal is still counted (`HubService.counters`, the `rejections` table); the log
gets at most one WARNING per (store, reason) per `interval_s`, and the next one says how
many were left out meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from common.logsetup import LogLimiter


class RefusalLog:
    """Log refusals at most once per (store, reason) per `interval_s`, counting the rest."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval_s
        self._monotonic = monotonic
        self._quiet = LogLimiter(interval_s)

    def refused(self, store_id: str | None, reason: str, topic: str, detail: str) -> bool:
        """Record one refusal; return True when it was logged (False: counted toward the next line)."""
        held = self._quiet.admit(f"{store_id}\x00{reason}", self._monotonic())
        if held is None:
            return False
        more = f" ({held} more refused for this store and reason in the last {self._interval:g} s)" if held else ""
        self._log.warning("hub: refused a message on %s (%s): %s%s", topic, reason, detail[:300], more)
        return True
