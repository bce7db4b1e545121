"""Run a real `edge-hub run` subprocess for tests (config under a tmp dir, SIGKILL-able)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def hub_command() -> list[str]:
    script = Path(sys.executable).parent / "edge-hub"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from sync.hub.cli import main; sys.exit(main())"]


class HubProcess:
    """One hub process; `start()` returns once it is connected (its log says so)."""

    def __init__(self, workdir: Path, broker, stores=("store-0042",), hub_id: str = "hub-1",
                 extra: str = "", protocol: int = 5):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "hub.db"
        self.config_path = self.dir / "hub.toml"
        self.output_path = self.dir / "hub.out"
        self.proc: subprocess.Popen | None = None
        stores_toml = "".join(f'[[stores]]\nid = "{s}"\nregion = "north"\n' for s in stores)
        self.config_path.write_text(
            f'[hub]\nid = "{hub_id}"\n[storage]\npath = "{self.db_path}"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprotocol = {protocol}\n'
            "reconnect_min_s = 0.05\nreconnect_max_s = 0.5\n"
            f'[log]\nformat = "text"\nlevel = "INFO"\n{extra}{stores_toml}')

    def start(self, timeout: float = 15.0, env: dict[str, str] | None = None) -> "HubProcess":
        """Start `edge-hub run` (with `env` added to a clean environment); return once connected."""
        mark = len(self.output())
        out = open(self.output_path, "ab")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGE_HUB__")}, **(env or {})}
        try:
            self.proc = subprocess.Popen([*hub_command(), "run", "--config", str(self.config_path)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while "connected to" not in self.output()[mark:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-hub exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"edge-hub did not connect in {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.03)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _cli(self, *args: str) -> str:
        done = subprocess.run([*hub_command(), *args, "--config", str(self.config_path)],
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    def export(self, store_id: str = "store-0042") -> list[dict]:
        return [json.loads(line) for line in self._cli("export", "--store", store_id).splitlines()]

    def stats(self) -> dict:
        return json.loads(self._cli("stats"))

    def __enter__(self) -> "HubProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running:
            self.kill()
