"""One hub worker at a time folds the projection and publishes snapshots and the catalog.

    leader = leader_for(config)          # SoleLeader (SQLite) or PgLeader (storage.url)
    service.jobs.append(leader.run)      # keeps trying for, or holding, the leadership
    if leader.is_leader: ...             # fold, compute, record (fenced), publish
    fence = leader.fence()               # the SQL condition a version write is guarded by

**SQLite** (one hub process): that process is always the leader (`SoleLeader`).

**PostgreSQL** (N workers on one database): `PgLeader` holds the session advisory lock
`LEADER_LOCK` (`pg_try_advisory_lock`) on a connection of its own, opened for it alone
and never taken from or given back to a pool. The lock lives exactly as long as that
backend: if the worker dies (SIGKILL, power), or the connection is cut or terminated
(`pg_terminate_backend`), PostgreSQL releases it and a waiting worker takes it at its next
try. Workers without the lock try again every `retry_s`; the leader checks its connection
every `retry_s` too (a check that fails or does not answer within `retry_s` ends its
leadership at once). So a takeover takes at most about two `retry_s` after the old
leader's backend is gone (a dead TCP peer without a FIN is found by the keepalives set on
the connection, within about `retry_s` + 3 probes).

**Fencing.** A worker can believe it leads for a moment after it lost the lock (between
two checks). Its writes are made harmless by a fence inside the write itself: the
snapshot version is persisted before the publish, guarded by `version < new` and by
`fence()`, "the advisory lock is granted to my lock connection's backend" (read from
`pg_locks` in the same statement). A deposed leader's version write therefore changes
nothing, raises `projection.Fenced`, and its snapshot is not published. The fold is safe
without a fence (`DELETE ... RETURNING`: two folds never add one pending row twice).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

log = logging.getLogger("edge_hub.leader")

# pg_try_advisory_lock(int4, int4): pg_locks shows it as classid = LOCK_CLASS, objid = LOCK_ID, objsubid 2.
LOCK_CLASS = 0x65646765  # "edge"
LOCK_ID = 1              # the snapshot publisher
RETRY_S = 2.0


class Leader(Protocol):
    is_leader: bool

    async def run(self) -> None: ...

    def fence(self) -> tuple[str, tuple]: ...

    def on_change(self, callback: Callable[[bool], None]) -> None: ...


class SoleLeader:
    """The single SQLite hub process: always the leader; its writes need no fence."""

    is_leader = True

    def __init__(self) -> None:
        self._callbacks: list[Callable[[bool], None]] = []

    async def run(self) -> None:
        await asyncio.Event().wait()

    def fence(self) -> tuple[str, tuple]:
        return "1 = 1", ()

    def on_change(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)


class PgLeader:
    """Leadership among the workers of one PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, retry_s: float = RETRY_S, name: str = "edge-hub-leader",
                 lock: tuple[int, int] = (LOCK_CLASS, LOCK_ID)):
        self.url = url
        self.retry_s = retry_s
        self.name = name
        self.lock = lock
        self.is_leader = False
        self.backend_pid: int | None = None  # the lock connection's backend while leading
        self.terms = 0                       # how many times this worker became the leader
        self._conn = None
        self._callbacks: list[Callable[[bool], None]] = []

    def on_change(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    def fence(self) -> tuple[str, tuple]:
        """The SQL condition "this worker's lock connection holds the leader lock" and its parameters."""
        return ("EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = ? AND objid = ?"
                " AND objsubid = 2 AND granted AND pid = ?)",
                (self.lock[0], self.lock[1], self.backend_pid if self.is_leader else -1))

    def _set(self, leading: bool) -> None:
        if leading == self.is_leader:
            return
        self.is_leader = leading
        if leading:
            self.terms += 1
            log.info("hub: this worker leads (lock connection backend %s)", self.backend_pid)
        else:
            self.backend_pid = None
            log.warning("hub: this worker no longer leads")
        for callback in self._callbacks:
            try:
                callback(leading)
            except Exception:
                log.exception("hub: leader change callback failed")

    async def _connect(self):
        import psycopg

        return await asyncio.wait_for(psycopg.AsyncConnection.connect(
            self.url, autocommit=True, application_name=self.name,
            connect_timeout=max(1, int(self.retry_s)),
            keepalives=1, keepalives_idle=max(1, int(self.retry_s)), keepalives_interval=1,
            keepalives_count=3), self.retry_s * 2)

    async def step(self) -> bool:
        """Try for (or check) the leadership once; return whether this worker leads."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            if self.is_leader:
                cur = await asyncio.wait_for(self._conn.execute("SELECT 1"), self.retry_s)
                await cur.fetchone()
            else:
                cur = await asyncio.wait_for(
                    self._conn.execute("SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()", self.lock),
                    self.retry_s)
                got, pid = await cur.fetchone()
                if got:
                    self.backend_pid = pid
                    self._set(True)
        except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
            if self.is_leader:
                log.warning("hub: leader lock connection lost: %s", exc)
            self._set(False)
            await self._drop()
        return self.is_leader

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.retry_s)
            except Exception:
                pass

    async def run(self) -> None:
        """Try for, then hold, the leadership until cancelled (the lock goes with the connection)."""
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.retry_s)
        finally:
            self._set(False)
            await self._drop()

    async def close(self) -> None:
        self._set(False)
        await self._drop()


def leader_for(url: str, retry_s: float = RETRY_S, name: str = "edge-hub-leader"):
    """The leader of a hub on `url` (PostgreSQL) or, for an empty url, the SQLite hub's SoleLeader."""
    return PgLeader(url, retry_s, name) if url else SoleLeader()
