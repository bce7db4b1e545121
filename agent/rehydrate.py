"""The agent's half of rehydrate: fence writes while the log lacks history the hub holds.

The sync process records the hub's ack for this store in sync.db (`hub_ack`, with the
log's incarnation it was heard under) and stages the events the hub sends back
(`history`); see sync/rehydrate.py. This process is the only writer of events.db: a
task of its own (`Rehydrator.run`) reads those rows read-only every `POLL_S` and appends
staged events that continue the log (agent/history.py checks the seqs, the store and
the chain; a history that does not chain is refused with an alarm and nothing of it is
appended). Every append (`POST /v1/events`, the service's lease expiry) is refused with
503 while `fence()` says why (the log's `write_fence`):

* `rehydrating`: the hub holds events 1..H of this store and the log only 1..L, L < H.
* `awaiting_hub`: the log was restored or rehydrated (incarnation > 1) and no ack from
  the hub has been heard since: a restored box must not write seqs the hub may hold.
* `history_refused`: the hub's history does not continue this log's chain (an ALARM:
  another box wrote this store's log; see docs/operations.md).

Reads keep working; /readyz answers 503 with the reason. With sync disabled nothing is
fenced: the store runs offline on its own log.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.history import HistoryRefused
from common.errors import StorageError
from common.sqlite import open_readonly

log = logging.getLogger("edge_agent.rehydrate")

POLL_S = 0.1
APPLY_MAX = 2000   # events per append transaction


@dataclass(frozen=True)
class Fence:
    code: str
    message: str
    hub_acked_seq: int | None
    last_seq: int


class Rehydrator:
    """See the module docstring. `await start()` once the log is open; `run()` as a task."""

    def __init__(self, event_log, sync_db: str | Path, *, enabled: bool = True):
        self.log = event_log
        self.path = Path(sync_db)
        self.enabled = enabled
        self.incarnation = 1
        self.hub: tuple[int, int] | None = None     # (acked_seq, incarnation heard under)
        self.refused: str | None = None
        self.appended = 0
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        self.incarnation = await self.log.incarnation()
        self.refresh()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and self.path.exists():
            try:
                self._conn = open_readonly(self.path, f"no sync database at {self.path}")
            except StorageError:
                return None
        return self._conn

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self._connection()
        if conn is None:
            return []
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):   # a sync.db from before rehydrate, or not yet set up
                return []
            raise

    def refresh(self) -> None:
        """Read the hub's ack as the sync process last heard it."""
        rows = self._read("SELECT acked_seq, incarnation FROM hub_ack WHERE id = 1")
        self.hub = (rows[0][0], rows[0][1]) if rows else None

    def fence(self) -> Fence | None:
        """Why writes are refused now, or None."""
        if not self.enabled:
            return None
        last = self.log.last_seq
        hub = self.hub
        acked = hub[0] if hub is not None else None
        if self.refused is not None:
            return Fence("history_refused", f"writes are refused: {self.refused}", acked, last)
        if hub is not None and hub[0] > last:
            return Fence("rehydrating", f"rehydrating: the hub holds events 1..{hub[0]} of this store, the log"
                                        f" 1..{last}; writes resume once the log holds them all", acked, last)
        if self.incarnation > 1 and (hub is None or hub[1] < self.incarnation):
            return Fence("awaiting_hub", f"the log was restored (incarnation {self.incarnation}, log at seq {last});"
                                         " writes wait until the hub's ack for this store has been heard", acked, last)
        return None

    def refusal(self):
        """The Refused (503) an append gets now, or None (the log's `write_fence`)."""
        from agent.inventory import Refused

        fence = self.fence()
        return None if fence is None else Refused(fence.code, fence.message, status=503)

    async def step(self) -> int:
        """Refresh the hub's ack; append staged history continuing the log. Returns events appended."""
        self.refresh()
        if self.hub is None or self.hub[0] <= self.log.last_seq:
            return 0
        last = self.log.last_seq
        rows = self._read("SELECT seq, body, hash FROM history WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                          (last, self.hub[0], APPLY_MAX))
        if not rows:
            return 0
        try:
            events = await self.log.append_history(rows)
        except HistoryRefused as exc:
            if str(exc) != self.refused:
                log.error("rehydrate: ALARM %s; writes stay refused", exc)
            self.refused = str(exc)
            return 0
        if self.refused is not None:
            log.warning("rehydrate: the hub's history continues the log again")
        self.refused = None
        self.appended += len(events)
        if self.log.last_seq >= self.hub[0]:
            log.warning("rehydrate: the log holds the hub's events 1..%d again (%d appended from the hub)",
                        self.log.last_seq, self.appended)
        return len(events)

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except (StorageError, sqlite3.Error) as exc:
                log.error("rehydrate: %s", exc)
            await asyncio.sleep(POLL_S)


# ------------------------------------------------------------- the command


def cmd_rehydrate(args, cfg) -> int:
    """`edge-agent rehydrate`: bring this box's log up to the hub's ack for the store, then exit.

    For a new box (an empty or missing log, the store's id and credentials) or one whose
    log is behind the hub. Runs the store's sync in this process until the log holds every
    event the hub acks; exit 0 then, 1 when the hub's history is refused or the time runs
    out, 2 while `edge-agent run` holds the log.
    """
    import sys

    from common.errors import LogLocked

    if not cfg.sync.enabled:
        print("edge-agent rehydrate: sync.enabled is false: there is no hub to rehydrate from", file=sys.stderr)
        return 2
    try:
        from agent.settings import config_path

        return asyncio.run(_rehydrate(cfg, args.timeout, config_path(args.config)))
    except LogLocked as exc:
        print(f"edge-agent rehydrate: {exc}; stop the service first (systemctl stop edge-agent)", file=sys.stderr)
        return 2


async def _rehydrate(cfg, timeout_s: float, config_file: str | None) -> int:
    """Run the store's sync as its own process (`python -m sync`, as the service does) and
    append the history it stages until the log reaches the hub's ack."""
    import os
    import signal
    import sys
    import time

    from tqdm import tqdm

    from agent.log import SqliteEventLog
    from agent.settings import sync_db_path
    from agent.supervisor import config_environment

    event_log = await SqliteEventLog.open(cfg.storage.path, cfg.store.id, synchronous=cfg.storage.synchronous)
    rehydrator = Rehydrator(event_log, sync_db_path(cfg))
    sync_proc = None
    bar = None
    try:
        incarnation = await event_log.bump_incarnation()
        await rehydrator.start()
        print(f"rehydrate: {cfg.store.id}, log at seq {event_log.last_seq}, incarnation {incarnation};"
              " waiting for the hub", file=sys.stderr)
        args = ["--config", os.path.abspath(config_file)] if config_file else []
        env = dict(os.environ, **({} if config_file else config_environment(cfg)))
        sync_proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sync", *args, env=env)
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        while True:
            await rehydrator.step()
            hub = rehydrator.hub
            if hub is not None and bar is None:
                bar = tqdm(total=hub[0], initial=event_log.last_seq, desc="rehydrate", unit="ev",
                           unit_scale=True, disable=not sys.stderr.isatty())
            if bar is not None:
                bar.total = max(bar.total or 0, hub[0])
                bar.update(event_log.last_seq - bar.n)
            if rehydrator.refused is not None:
                print(f"edge-agent rehydrate: ALARM {rehydrator.refused}", file=sys.stderr)
                return 1
            if hub is not None and hub[1] >= incarnation and hub[0] <= event_log.last_seq:
                print(f"rehydrated {cfg.storage.path}: events 1..{event_log.last_seq} (the hub acks {hub[0]});"
                      " start the service (systemctl start edge-agent)")
                return 0
            if sync_proc.returncode is not None:
                print(f"edge-agent rehydrate: the sync process stopped (status {sync_proc.returncode})",
                      file=sys.stderr)
                return 1
            if deadline is not None and time.monotonic() > deadline:
                print(f"edge-agent rehydrate: no complete history within {timeout_s:g} s (log at"
                      f" {event_log.last_seq}, hub {'not heard' if hub is None else hub[0]}); is the hub reachable?",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()
        if sync_proc is not None and sync_proc.returncode is None:
            sync_proc.send_signal(signal.SIGTERM)   # a clean stop: its cursor and staging are saved
            try:
                await asyncio.wait_for(sync_proc.wait(), 30)
            except asyncio.TimeoutError:
                sync_proc.kill()
                await sync_proc.wait()
        rehydrator.close()
        await event_log.close()


def add_rehydrate_parser(subparsers):
    parser = subparsers.add_parser(
        "rehydrate", help="fetch this store's history from the hub into the log (a new box; service stopped)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up after this many seconds (0: never; default 600)")
    parser.set_defaults(fn=cmd_rehydrate)
    return parser
