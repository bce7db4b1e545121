"""I/O errors injected into a running process's syscalls on one file, with strace (root only).

    with InjectEio(pid, path, "fdatasync") as fault:   # every call on `path` (when="1+")
        ...                                            # the process sees EIO on that syscall
    fault.injected                                     # how many calls strace failed

strace attaches to every thread of `pid` (`-f -p`), fails `syscall` with EIO when it
touches `path` (`-P`: its other files and its children are left alone), and detaches at
exit (SIGTERM), after which the same calls work again: a disk that came back. An EIO from
strace is returned instead of running the call, so the data is not lost underneath; what
is tested is what the process does with the error: answer it, never acknowledge it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import require_binary, unavailable


class InjectEio:
    def __init__(self, pid: int, path: Path, syscall: str, when: str = "1+", out: Path | None = None):
        self.strace = require_binary("strace")
        if os.geteuid() != 0:
            unavailable("strace -p needs root (or ptrace rights) to attach to the agent")
        self.pid, self.path, self.syscall, self.when = pid, Path(path), syscall, when
        self.out = Path(out) if out else self.path.with_name(f"strace-{syscall}.out")
        self.proc: subprocess.Popen | None = None
        self.injected = 0

    def __enter__(self) -> "InjectEio":
        self.proc = subprocess.Popen(
            [self.strace, "-f", "-qq", "-p", str(self.pid), "-P", str(self.path), "-e", f"trace={self.syscall}",
             "-e", f"inject={self.syscall}:error=EIO:when={self.when}", "-o", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Attached once the threads are stopped and resumed under ptrace: /proc says TracerPid.
        deadline = time.monotonic() + 10
        while _tracer(self.pid) != self.proc.pid:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strace did not attach to {self.pid}: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # strace detaches and lets the process run on
            self.proc.wait(15)
        deadline = time.monotonic() + 10
        while _tracer(self.pid) not in (0, None) and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            self.injected = self.out.read_text(errors="replace").count("(INJECTED)")
        except FileNotFoundError:
            self.injected = 0


def _tracer(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None
