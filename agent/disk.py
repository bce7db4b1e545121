"""Free-space guard for the state directory: refuse writes before SQLite hits a full disk.

`DiskGuard` is the `disk_guard` callable SqliteEventLog.open takes. It runs before every
append, so it reads statvfs at most once per `ttl` seconds. Reads never consult it.
When free space falls under the floor, appends raise StorageFull (the API answers 507);
once space returns, the next append after the cache expires goes through again.
Each transition is logged once, with the figures.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from common.errors import StorageFull

log = logging.getLogger("edge_agent.disk")

MIB = 1024 * 1024


class DiskGuard:
    """Raise StorageFull when free space under `path` is below `min_free_bytes`."""

    def __init__(self, path: str | os.PathLike, min_free_bytes: int, *, ttl: float = 1.0,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 monotonic: Callable[[], float] = time.monotonic):
        self.path = str(path)
        self.min_free_bytes = min_free_bytes
        self.ttl = ttl
        self._statvfs = statvfs
        self._monotonic = monotonic
        self._checked_at = float("-inf")
        self._free = 0
        self.full = False

    @classmethod
    def for_storage(cls, db_path: str | os.PathLike, min_free_mb: int) -> "DiskGuard":
        """Return a guard for the directory holding the log (created if missing)."""
        directory = Path(db_path).parent
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, min_free_mb * MIB)

    def free_bytes(self) -> int:
        """Return the bytes available to us under `path`, cached for `ttl` seconds."""
        now = self._monotonic()
        if now - self._checked_at >= self.ttl:
            self.refresh(now)
        return self._free

    def refresh(self, now: float | None = None) -> bool:
        """Read statvfs now, log a transition once; return True when writes are allowed."""
        try:
            st = self._statvfs(self.path)
            free = st.f_bavail * st.f_frsize
        except OSError as exc:
            # Unknown is not full: SQLite's own SQLITE_FULL still stops a write safely.
            log.warning("disk: cannot statvfs %s: %s", self.path, exc)
            free = self.min_free_bytes
        self._free = free
        self._checked_at = self._monotonic() if now is None else now
        full = free < self.min_free_bytes
        if full and not self.full:
            log.error("disk: %.1f MiB free under %s, below storage.min_free_mb=%d:"
                      " writes refused (507) until space returns; reads continue",
                      free / MIB, self.path, self.min_free_bytes // MIB)
        elif self.full and not full:
            log.warning("disk: %.1f MiB free under %s again: writes resume", free / MIB, self.path)
        self.full = full
        return not full

    def __call__(self) -> None:
        """Raise StorageFull when free space is under the floor (cheap: cached statvfs)."""
        free = self.free_bytes()
        if self.full:
            raise StorageFull(
                f"storage: only {free // MIB} MiB free under {self.path}, below the"
                f" {self.min_free_bytes // MIB} MiB floor (storage.min_free_mb): writes are refused"
                " until space is freed; reads still work")
