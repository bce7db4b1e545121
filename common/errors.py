"""The agent's own errors; SQLite's never travel past the storage adapter."""

from __future__ import annotations

import sqlite3


class StorageError(Exception):
    """SQLite could not do what was asked; nothing was committed."""


class StorageFull(StorageError):
    """The disk (or the configured free-space floor) is full; writes are refused, reads work."""


class LogLocked(StorageError):
    """Another process holds the log for writing."""


def storage_error(step: str, exc: sqlite3.Error) -> StorageError:
    """Map a sqlite3 error to ours, naming the step."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return StorageFull(f"storage: {step}: the disk is full ({exc})")
    return StorageError(f"storage: {step}: {exc}")
