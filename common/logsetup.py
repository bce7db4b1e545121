"""Logging for the services: stdlib logging to stderr, in one of three formats.

- `journal` (default): each line starts with a syslog priority prefix (`<3>` error,
  `<4>` warning, `<6>` info, `<7>` debug), which journald reads from a service's stderr;
  a traceback's lines each carry the prefix so they keep the record's priority.
- `json`: one JSON object per line (`ts`, `level`, `logger`, `msg`, `exc`?), for shippers.
- `text`: timestamped lines for a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """Return the syslog priority for a logging level."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITY[level]
    return PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, every line of it prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {super().format(record)}"
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "journal", stream: IO[str] | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one stderr handler in `fmt`; return it.

    Raises ValueError for an unknown format (settings already restricts the choice).
    """
    if fmt == "journal":
        formatter: logging.Formatter = JournalFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    elif fmt == "text":
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        raise ValueError(f"log.format must be journal, json or text, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler logs every run at INFO; our jobs log what matters themselves.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
    return handler


class LogLimiter:
    """Say once per `interval` and key; count what was held back in between."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str, now: float) -> int | None:
        """None: stay quiet (counted). Else log now; the int is how many were held back since."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
