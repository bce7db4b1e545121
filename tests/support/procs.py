"""Finding a test's own processes by what their command lines name."""

from __future__ import annotations

from pathlib import Path


def processes_under(state: Path) -> list[int]:
    """Pids whose command line names the demo's state directory (its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(state).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
