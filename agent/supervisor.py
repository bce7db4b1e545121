"""`edge-agent run` keeps `edge-agent sync` running as its child.

The only channels between the two are SQLite files and the child's lifetime: no socket,
no frames, no RPC. The supervisor
- starts `python -m sync` with the agent's config (`--config PATH`; without a file, the
  config as EDGE_AGENT__SECTION__KEY variables), `sync.nice` steps nicer than the agent,
  without NOTIFY_SOCKET (the agent alone talks to systemd);
- restarts it when it exits, after a back-off that doubles from `sync.restart_min_s` to
  `sync.restart_max_s` and starts over once a child has run a minute;
- restarts it when its heartbeat in sync.db is older than `sync.stall_after_s` (a frozen
  sync), so a stuck uplink never needs the whole store service restarted;
- on stop, sends SIGTERM (the child publishes its offline status and exits 0) and
  SIGKILLs it after `STOP_TIMEOUT_S`. The child also dies with the agent: it asks the
  kernel for SIGKILL when its parent dies (sync/app.py, EDGE_SYNC_PARENT), so a crashed
  agent is one crashed service and the broker publishes the store's offline will.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import msgspec

from agent.ports import SyncView
from agent.settings import AgentConfig
from common.aio import wait_for

log = logging.getLogger("edge_agent.supervisor")

STOP_TIMEOUT_S = 5.0
STABLE_AFTER_S = 60.0
PARENT_ENV = "EDGE_SYNC_PARENT"


def config_environment(config: AgentConfig) -> dict[str, str]:
    """Every key of `config` as EDGE_AGENT__SECTION__KEY (TOML values), for a child with no file."""
    env = {}
    for section, keys in msgspec.to_builtins(config).items():
        for key, value in keys.items():
            text = json.dumps(value) if isinstance(value, str) else (
                ("true" if value else "false") if isinstance(value, bool) else repr(value))
            env[f"EDGE_AGENT__{section.upper()}__{key.upper()}"] = text
    return env


class SyncSupervisor:
    """Runs the sync child until cancelled; see the module docstring."""

    def __init__(self, config: AgentConfig, config_path: str | None, view: SyncView, *,
                 command: list[str] | None = None, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.view = view
        self.command = command or [sys.executable, "-m", "sync"]
        self._args = ["--config", config_path] if config_path else []
        self._env_extra = {} if config_path else config_environment(config)
        self._monotonic = monotonic
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stalls = 0
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def state(self) -> dict[str, Any]:
        """What GET /v1/sync shows of the child: pid, restarts, stalls."""
        return {"pid": self.pid, "restarts": self.restarts, "stalls": self.stalls}

    async def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") and not k.startswith("EDGE_AGENT__")}
        env.update(self._env_extra)
        if not self._env_extra:   # a file: the agent's own overrides apply to the child too
            env.update({k: v for k, v in os.environ.items() if k.startswith("EDGE_AGENT__")})
        env[PARENT_ENV] = str(os.getpid())
        self.process = await asyncio.create_subprocess_exec(
            *self.command, *self._args, env=env, stdin=asyncio.subprocess.DEVNULL)
        self._started_at = self._monotonic()
        try:
            os.setpriority(os.PRIO_PROCESS, self.process.pid,
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.config.sync.nice))
        except OSError as exc:   # it has already exited: the wait below says so
            log.debug("supervisor: could not renice sync (pid %d): %s", self.process.pid, exc)
        log.info("supervisor: started edge-agent sync (pid %d)", self.process.pid)

    def _stalled(self) -> bool:
        """True when the running child's heartbeat is older than `sync.stall_after_s`."""
        limit = self.config.sync.stall_after_s
        if self._monotonic() - self._started_at < limit:
            return False
        status = self.view.status()
        if status.get("pid") != self.process.pid:
            return True   # running for `limit` and never recorded a heartbeat
        age = status.get("beat_age_s")
        return age is not None and age > limit

    async def _watch(self) -> int:
        """Wait for the child to exit; SIGKILL it first when it stalls. Return its exit status."""
        every = max(0.05, self.config.sync.heartbeat_s)
        while True:
            try:
                return await wait_for(self.process.wait(), every)
            except TimeoutError:
                pass
            if self._stalled():
                self.stalls += 1
                log.error("supervisor: edge-agent sync (pid %d) has not recorded a heartbeat for over %.0f s;"
                          " killing it", self.process.pid, self.config.sync.stall_after_s)
                self.process.kill()

    async def run(self) -> None:
        """Keep the child running until cancelled; then stop it (see `stop`)."""
        delay = self.config.sync.restart_min_s
        try:
            while True:
                await self._spawn()
                code = await self._watch()
                ran = self._monotonic() - self._started_at
                if ran >= STABLE_AFTER_S:
                    delay = self.config.sync.restart_min_s
                self.restarts += 1
                log.error("supervisor: edge-agent sync (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                          self.process.pid, _describe(code), ran, delay)
                await asyncio.sleep(delay)
                delay = min(self.config.sync.restart_max_s, delay * 2)
        finally:
            await asyncio.shield(self.stop())

    async def stop(self) -> None:
        """SIGTERM the child and wait for it; SIGKILL it after STOP_TIMEOUT_S."""
        if not self.running:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("supervisor: edge-agent sync ignored SIGTERM for %.0f s; killing it", STOP_TIMEOUT_S)
            self.process.kill()
            await self.process.wait()
        log.info("supervisor: edge-agent sync stopped (%s)", _describe(self.process.returncode))


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
