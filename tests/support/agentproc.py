"""Run a real `edge-agent run` as a subprocess, for tests about processes and crashes.

    from tests.support.agentproc import AgentProcess

    def test_something(tmp_path):
        with AgentProcess(tmp_path, write_token="t0ken",
                          sections={"mqtt": {"port": broker.port}}) as agent:
            status, body = agent.request("GET", "/v1/stock/A1")      # JSON in, JSON out
            agent.kill()                  # SIGKILL: a crash
            agent.start()                 # same config and database, new free port
            assert agent.terminate() == 0 # SIGTERM: a clean stop, returns the exit status

Contract:
- The config is a TOML file written under `tmp_path` (`agent.config_path`), the log is
  `tmp_path / "events.db"` unless `db_path` is given; `sections` adds or overrides keys
  per section (values: str, int, float, bool). `api.port` is a free loopback port,
  picked anew at every `start()` (so `agent.url` can change across restarts).
- `start()` returns once GET /readyz answers 200, or raises AgentStartError with the
  exit status and the tail of the process's output when it exits first or times out.
- Output (stdout and stderr together) goes to `agent.output_path`; `agent.output()`
  reads it. The environment is the test's, minus any EDGE_AGENT__* variables, plus `env`.
- Leaving the `with` block SIGKILLs a process still running (a test that wants a clean
  stop calls `terminate()` and checks its status).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence
from tests.support.net import free_port


class AgentStartError(RuntimeError):
    """The agent exited or never became ready; the message has its output's tail."""


def agent_command() -> list[str]:
    """The `edge-agent` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "edge-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"agentproc: cannot write {value!r} as a TOML value")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Write `sections` ({section: {key: value}}) as a TOML file."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))


class AgentProcess:
    """One `edge-agent run` subprocess with its own config and database."""

    def __init__(self, tmp_path: Path, store_id: str = "store-0042", *, write_token: str = "",
                 db_path: Path | None = None, sections: Mapping[str, Mapping[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None, synchronous: str = "FULL",
                 launcher: Sequence[str] = (), run_args: Sequence[str] = (),
                 wait_connected: bool = False):
        self.dir = Path(tmp_path)
        self.store_id = store_id
        self.write_token = write_token
        self.db_path = Path(db_path) if db_path else self.dir / "events.db"
        self.config_path = self.dir / "agent.toml"
        self.output_path = self.dir / "agent.out"
        self.sections = {k: dict(v) for k, v in (sections or {}).items()}
        self.synchronous = synchronous
        self.env = dict(env or {})
        self.launcher = list(launcher)   # e.g. ["nice", "-n", "5"]: must exec the agent (same pid)
        self.run_args = list(run_args)   # after `run`, e.g. ["--no-sync"]
        self.wait_connected = wait_connected   # start() also waits for the sync process's connection
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 20.0) -> "AgentProcess":
        """Start the agent on a fresh free port and wait for /readyz; see the module contract."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"agentproc: the agent (pid {self.proc.pid}) is already running")
        for attempt in range(3):
            self.port = free_port()
            self._write_config()
            self._spawn()
            try:
                self.wait_ready(timeout)
                if self.wait_connected:
                    self._wait_connected(timeout)
                return self
            except AgentStartError:
                # Another test may have taken the port between our probe and the bind.
                if attempt < 2 and "address already in use" in self.output().lower():
                    continue
                raise
        raise AssertionError("unreachable")

    def _write_config(self) -> None:
        sections: dict[str, dict[str, Any]] = {
            "store": {"id": self.store_id},
            "storage": {"path": str(self.db_path), "synchronous": self.synchronous},
            "api": {"host": "127.0.0.1", "port": self.port, "write_token": self.write_token},
        }
        for section, keys in self.sections.items():
            sections.setdefault(section, {}).update(keys)
        sections["api"]["port"] = self.port
        write_config(self.config_path, sections)

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
        env.update(self.env)
        out = open(self.output_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*self.launcher, *agent_command(), "run", "--config", str(self.config_path), *self.run_args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        finally:
            out.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll GET /readyz until 200; raise AgentStartError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll() if self.proc else -1
            if code is not None:
                raise AgentStartError(f"agentproc: edge-agent run exited with {code} before ready:\n"
                                      f"{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AgentStartError(f"agentproc: not ready on {self.url} after {timeout}s:\n"
                                      f"{self.output()[-4000:]}")
            time.sleep(0.05)

    def _wait_connected(self, timeout: float) -> None:
        """Poll GET /v1/sync until the sync process reports its broker connection."""
        deadline = time.monotonic() + timeout
        while self.request("GET", "/v1/sync")[1].get("connected") is not True:
            if time.monotonic() > deadline or not self.running:
                raise AgentStartError(f"agentproc: sync not connected after {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM the agent and return its exit status (raises TimeoutError if it hangs)."""
        return self._stop(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL the agent (a crash) and return its exit status."""
        return self._stop(signal.SIGKILL, 10.0)

    def _stop(self, sig: int, timeout: float) -> int:
        if self.proc is None:
            raise RuntimeError("agentproc: the agent was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError(f"agentproc: edge-agent run ignored signal {sig} for {timeout}s:\n"
                               f"{self.output()[-4000:]}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """The pids of the agent's child processes (its sync process), from /proc."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return []
        return [int(pid) for pid in text.split()]

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.kill()

    # ------------------------------------------------------------- requests

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        """Make one HTTP request; return (status, decoded JSON body or text).

        `body` is sent as JSON (bytes are sent as they are). `token` defaults to the
        configured write token (None and no token: no Authorization header).
        """
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        token = self.write_token if token is None else token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype and raw else raw.decode(errors="replace"))
