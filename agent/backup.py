"""Online backups of the log into a rotated set of files, their checks, and restore.

A backup is taken on the log's writer thread with SQLite's backup API, so it is one
consistent copy even under write load (the writer does nothing else meanwhile). It is
written as `<name>.partial`, checked (integrity_check, gapless seqs, hash chain and
projections via agent.verify), fsynced, and only then renamed into place; the oldest
files beyond `storage.backup_keep` are removed. A failed check leaves no file behind.

`restore` copies a checked backup over the log while holding the log's flock, so it is
refused while `edge-agent run` holds the log; the restored log gets a new incarnation
(agent/history.py), so it writes again only once the hub has been heard from.

`edge-agent backup` takes one now through a read-only connection of its own (see
`_ReadOnlySource`), so it works while `edge-agent run` holds the log.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.disk import MIB
from agent.history import incarnation_of, set_incarnation
from common.errors import LogLocked, StorageError, StorageFull

log = logging.getLogger("edge_agent.backup")

BACKUP_RE = re.compile(r"^events-(\d{8}T\d{6}\d{3}Z)-seq(\d+)\.db$")


class BackupError(StorageError):
    """A backup could not be taken, did not pass its check, or could not be restored."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    last_seq: int
    bytes: int
    seconds: float


def backup_dir(storage_path: str | os.PathLike, configured: str = "") -> Path:
    """Return storage.backup_dir, or <storage dir>/backups when it is empty."""
    return Path(configured) if configured else Path(storage_path).parent / "backups"


def list_backups(directory: str | os.PathLike) -> list[Path]:
    """Return our backup files in `directory`, oldest first (by name: time, then seq)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if BACKUP_RE.match(p.name))


def check_backup(path: str | os.PathLike) -> tuple[int, list[str]]:
    """Check a backup file; return (last_seq, problems), no problems meaning it is sound.

    Uses agent.verify.verify_log (integrity, gapless seqs, hash chain, projections).
    """
    from agent.verify import verify_log

    try:
        report = verify_log(path)
    except StorageError as exc:
        return 0, [str(exc)]
    return report.last_seq, list(report.problems)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"


def _finalize(dest: Path) -> None:
    """Make the copy a standalone rollback-journal file so it opens read-only anywhere."""
    conn = sqlite3.connect(dest, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()


async def take_backup(event_log, directory: str | os.PathLike, keep: int,
                      min_free_bytes: int = 0) -> BackupResult:
    """Back up `event_log` into `directory`, check it, rotate to the newest `keep`.

    Returns the new file and the last seq it holds. Raises StorageFull when the copy
    would leave less than `min_free_bytes` free, BackupError when the copy fails its check
    (nothing is left behind then).
    """
    started = time.monotonic()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in (Path(event_log.path), Path(f"{event_log.path}-wal")) if p.exists())
    st = os.statvfs(directory)
    if st.f_bavail * st.f_frsize - size < min_free_bytes:
        raise StorageFull(f"backup: {directory} has {st.f_bavail * st.f_frsize // MIB} MiB free; a"
                          f" {size // MIB} MiB copy would go below the {min_free_bytes // MIB} MiB floor")
    for stale in directory.glob("events-*.partial*"):  # left by a backup cut short at shutdown
        stale.unlink(missing_ok=True)
    partial = directory / f"events-{_stamp()}.partial"
    try:
        seq = await event_log.backup_to(partial)
        _finalize(partial)
        checked_seq, problems = check_backup(partial)
        if problems or checked_seq != seq:
            raise BackupError(f"backup: {partial.name} failed its check (seq {checked_seq}, expected {seq}): "
                              + "; ".join(problems[:5]))
        _fsync_path(partial)
        final = directory / f"events-{partial.name[7:-8]}-seq{seq}.db"
        os.replace(partial, final)
        _fsync_path(directory)
    except BaseException:
        for leftover in (partial, Path(f"{partial}-journal")):
            leftover.unlink(missing_ok=True)
        raise
    for old in list_backups(directory)[:-keep]:
        old.unlink(missing_ok=True)
        log.info("backup: removed %s (keeping the newest %d)", old.name, keep)
    result = BackupResult(final, seq, final.stat().st_size, time.monotonic() - started)
    log.info("backup: %s holds events 1..%d (%.1f MiB, checked, %.2f s)",
             final.name, seq, result.bytes / MIB, result.seconds)
    return result


def restore(backup: str | os.PathLike, db_path: str | os.PathLike) -> int:
    """Replace the log at `db_path` with `backup`; return the restored log's last seq.

    The backup is checked first and the restored log after; the previous log (if any) is
    kept as `<db>.before-restore-<time>`. Raises LogLocked while a service holds the log,
    BackupError when either check fails (on the second, the previous log is put back).
    """
    backup, db_path = Path(backup), Path(db_path)
    if not backup.is_file():
        raise BackupError(f"restore: {backup} is not a file")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(f"{db_path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogLocked(f"restore: {db_path} is held by a running agent; stop it first"
                            " (systemctl stop edge-agent)") from None
        seq, problems = check_backup(backup)
        if problems:
            raise BackupError(f"restore: {backup} failed its check: " + "; ".join(problems[:5]))
        staged = db_path.with_name(db_path.name + ".restoring")
        staged.unlink(missing_ok=True)
        src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
        dst = sqlite3.connect(staged, isolation_level=None)
        try:
            src.backup(dst)
            # A new incarnation: above the backup's and the replaced log's, so the hub can tell
            # this log's batches from the old one's, and the agent waits for the hub's ack
            # before it writes (agent/rehydrate.py).
            incarnation = max(incarnation_of(src), _incarnation_at(db_path)) + 1
            with dst:
                set_incarnation(dst, incarnation)
        finally:
            dst.close()
            src.close()
        _fsync_path(staged)
        kept = None
        if db_path.exists():
            kept = db_path.with_name(f"{db_path.name}.before-restore-{_stamp()}")
            os.replace(db_path, kept)
        # A WAL or shm left from the old log would be replayed into the restored one.
        for side in ("-wal", "-shm"):
            old = Path(f"{db_path}{side}")
            if old.exists():
                if kept is not None:
                    os.replace(old, Path(f"{kept}{side}"))
                else:
                    old.unlink()
        os.replace(staged, db_path)
        _fsync_path(db_path.parent)
        restored_seq, problems = check_backup(db_path)
        if problems or restored_seq != seq:
            if kept is not None:
                os.replace(db_path, db_path.with_name(db_path.name + ".failed-restore"))
                os.replace(kept, db_path)
            raise BackupError("restore: the restored log failed verify: " + "; ".join(problems[:5]))
        log.warning("restore: %s now holds events 1..%d from %s (incarnation %d)%s", db_path, seq, backup.name,
                    incarnation, f" (previous log kept as {kept.name})" if kept else "")
        return seq
    finally:
        os.close(lock_fd)


def _incarnation_at(db_path: Path) -> int:
    """The incarnation of the log at `db_path` (0 when there is none or it cannot be read)."""
    if not db_path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return incarnation_of(conn)
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


class _ReadOnlySource:
    """The log as `take_backup` sees it, read through a read-only connection of its own.

    SQLite's backup API run in one step holds one read transaction over the whole copy,
    so the copy is one consistent state of the log while `edge-agent run` keeps writing
    (WAL readers never block the writer, and a read-only connection never checkpoints).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    async def backup_to(self, target: str | os.PathLike) -> int:
        import asyncio

        def run() -> int:
            src = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                dest = sqlite3.connect(target)
                try:
                    src.backup(dest, pages=-1)
                    return dest.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
                finally:
                    dest.close()
            finally:
                src.close()

        return await asyncio.to_thread(run)


def cmd_backup(args: argparse.Namespace, cfg) -> int:
    """`edge-agent backup`: take a checked backup now, also while the service runs; exit 0 or 1."""
    import asyncio

    path = Path(cfg.storage.path)
    if not path.is_file():
        print(f"edge-agent backup: no log at {path}", file=sys.stderr)
        return 1
    directory = args.dir or backup_dir(cfg.storage.path, cfg.storage.backup_dir)
    try:
        result = asyncio.run(take_backup(_ReadOnlySource(path), directory, cfg.storage.backup_keep,
                                         min_free_bytes=cfg.storage.min_free_mb * MIB))
    except StorageError as exc:
        print(f"edge-agent backup: {exc}", file=sys.stderr)
        return 1
    print(f"{result.path}: events 1..{result.last_seq}, checked ({result.bytes / MIB:.1f} MiB, {result.seconds:.2f} s)")
    return 0


def add_backup_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `backup` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("backup", help="take a checked backup of the log now (also while it runs)")
    parser.add_argument("--dir", help="where to write it (default: storage.backup_dir)")
    parser.set_defaults(fn=cmd_backup)
    return parser


def cmd_restore(args: argparse.Namespace, cfg) -> int:
    """`edge-agent restore --from BACKUP`: restore the configured log; exit 0, 1 (check) or 2 (locked)."""
    source = args.from_path
    try:
        seq = restore(source, cfg.storage.path)
    except LogLocked as exc:
        print(f"edge-agent restore: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"edge-agent restore: {exc}", file=sys.stderr)
        return 1
    note = ("; once started, it takes writes after the hub's ack has been heard (and the hub's newer"
            " events fetched back)") if cfg.sync.enabled else ""
    print(f"restored {cfg.storage.path} from {source}: events 1..{seq}, verify OK{note}")
    return 0


def add_restore_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `restore` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("restore", help="restore the log from a backup file (service stopped)")
    parser.add_argument("--from", dest="from_path", required=True, metavar="BACKUP",
                        help="a backup file, e.g. /var/lib/edge-agent/backups/events-...-seq812.db")
    parser.set_defaults(fn=cmd_restore)
    return parser
