"""Helpers the benchmark scripts share: free ports, a pre-built log of N events, the source
tree whose store processes are measured, the bench lock, and readings from /proc."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agent import events as ev
from agent.log import SqliteEventLog

ROOT = Path(__file__).resolve().parent.parent
LOCK_PATH = Path("/tmp/lead_bench.lock")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# As systemd/edge-agent.service sets it (Environment=MALLOC_ARENA_MAX=2): without it every
# thread of a store process keeps its freed memory in a malloc arena of its own.
STORE_ENV = {"MALLOC_ARENA_MAX": "2"}

POLICIES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
            6: "SCHED_DEADLINE"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:`port`; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


async def build_log(path: Path, store_id: str, n: int, skus: int) -> None:
    """Fill (or top up) the log at `path` to `n` `received` events over `skus` SKUs.

    1000-event commands at synchronous=NORMAL (the fill is not what is measured); ends
    with a projection checkpoint and a truncated WAL, as a long-running agent would be.
    """
    log = await SqliteEventLog.open(path, store_id, synchronous="NORMAL")
    try:
        done = log.last_seq
        while done < n:
            size = min(1000, n - done)
            intents = [ev.Receive(sku=f"SKU-{(done + i) % skus}", qty=1 + i % 9) for i in range(size)]
            await log.append(ev.AppendCommand(command_id=str(uuid.uuid4()), events=intents))
            done += size
        await log.checkpoint_projection()
        await log.wal_checkpoint("TRUNCATE")
    finally:
        await log.close()


@dataclass(frozen=True)
class Tree:
    """A source tree whose `edge-agent` is measured: its own venv (`uv sync --frozen` in it)
    and its own package on PYTHONPATH, so the agent and every process it starts run that code."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / ".venv" / "bin"

    def check(self) -> None:
        """Raise SystemExit naming what is missing when the tree cannot run."""
        if not (self.bin / "edge-agent").exists():
            raise SystemExit(f"bench: {self.bin / 'edge-agent'} does not exist (run `uv sync --frozen` in {self.root})")

    def label(self) -> str:
        """The tree's commit, with "+changes" when its work tree differs from it."""
        head = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(self.root), "status", "--porcelain", "--untracked-files=no",
                                "--", "agent", "sync", "common"], capture_output=True, text=True).stdout.strip()
        return f"{head}+changes" if dirty else head

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a store process gets: the unit's, this tree's package first.

        Start it in "/" (cwd="/"), as systemd does: `python -m sync` and `python -c` put the
        working directory ahead of PYTHONPATH on sys.path."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("EDGE_AGENT__") and k not in ("NOTIFY_SOCKET", "PYTHONPATH")}
        env.update(STORE_ENV, PYTHONPATH=str(self.root), **extra)
        return env

    def build_log(self, path: Path, store_id: str, n: int, skus: int) -> None:
        """`build_log` with this tree's own code (its log's tables), in a process of its own."""
        code = ("import asyncio, sys; from pathlib import Path; from bench.common import build_log; "
                "asyncio.run(build_log(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))")
        subprocess.run([str(self.bin / "python"), "-c", code, str(path), store_id, str(n), str(skus)],
                       env=self.env(), cwd="/", check=True)

    def agent_argv(self, config: Path) -> list[str]:
        """`edge-agent run --config F`, as the unit starts it; a tree whose command line takes
        --config only before the subcommand (older trees) gets `edge-agent --config F run`."""
        probe = subprocess.run(
            [str(self.bin / "python"), "-c",
             "from agent.cli import build_parser; build_parser().parse_args(['run', '--config', 'x'])"],
            env=self.env(), cwd="/", capture_output=True)
        head = [str(self.bin / "edge-agent")]
        return [*head, "run", "--config", str(config)] if probe.returncode == 0 else [
            *head, "--config", str(config), "run"]


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    """Hold /tmp/lead_bench.lock, so that two timed runs on this machine never overlap."""
    with open(LOCK_PATH, "a") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bench: waiting for {LOCK_PATH} (another bench holds it)", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def others_running() -> list[str]:
    """Test runs and benches on this machine other than this one (pytest, bench/*.py)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names = [Path(a.decode(errors="replace")).name for a in argv[:3]]
        if "pytest" in names or any(a.startswith(b"bench/") or b"/bench/" in a for a in argv[1:2]):
            found.append(f"{entry.name}: {b' '.join(argv).decode(errors='replace')[:80]}")
    return found


def wait_quiet(max_s: float) -> float:
    """Wait up to `max_s` for no other test run or bench; return the seconds waited."""
    t0 = time.monotonic()
    while others_running() and time.monotonic() - t0 < max_s:
        time.sleep(1)
    return round(time.monotonic() - t0, 1)


class Overlap:
    """Samples `others_running` in a thread; `seen` lists what ran beside the measurement."""

    def __init__(self, every_s: float = 1.0):
        import threading

        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.seen.update(line.split(":", 1)[1].strip()[:60] for line in others_running())

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        return sorted(self.seen)


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields from field 3 (state) on: index i is field i + 3 of proc(5)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (all its threads)."""
    f = stat_fields(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def scheduling(pid: int) -> str:
    """The process's policy and nice, e.g. "SCHED_OTHER nice 5"."""
    f = stat_fields(pid)
    return f"{POLICIES.get(int(f[38]), f[38])} nice {int(f[16])}"


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return kids
    for task in tasks:
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def rollup_kib(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB (Rss, Pss, Private_Dirty, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        out[key.rstrip(":")] = int(value)
    return out


def unique_kib(pids: list[int]) -> int:
    """The physical memory the processes `pids` map, each page counted once however many of
    them map it (pages other processes map too count in full). Needs root (page frame numbers)."""
    frames: set[int] = set()
    for pid in pids:
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if line.endswith("[vsyscall]"):
                    continue
                pagemap.seek(start // (PAGE_KIB * 1024) * 8)
                raw = pagemap.read((end - start) // (PAGE_KIB * 1024) * 8)
                for (entry,) in struct.iter_unpack("<Q", raw):
                    if entry >> 63:   # present in RAM
                        frames.add(entry & ((1 << 55) - 1))
    if frames == {0}:
        raise PermissionError("bench: /proc/PID/pagemap shows no page frame numbers (not root?)")
    return len(frames) * PAGE_KIB
