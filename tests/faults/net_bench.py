"""Scenarios 5, 6 and 9 at bench sizes: `bench_runs(workdir)` yields one Figures per run.

bench/faults.py calls this (see docs/reliability.md); the CI sizes are in the tests.
Root is needed, as for the tests (namespaces, strace, tmpfs, loop device).
"""

from __future__ import annotations

import statistics
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.faults.io_scenarios import run_disk_full, run_eio, run_power_cut
from tests.faults.net_load import Figures
from tests.faults.net_scenarios import World, run_lossy, run_partition, run_slow
from tests.support.broker import Broker

# (name, CI size, bench size): what each run's knobs are at each size.
SIZES = {
    "partition": ({"seconds": 30.0, "cycles": 1}, {"seconds": 45.0, "cycles": 5}),
    "lossy": ({"percent": 20, "seconds": 4.0}, {"percent": 20, "seconds": 60.0}),
    "slow": ({"rate": "256kbit", "seconds": 3.0}, {"rate": "256kbit", "seconds": 30.0}),
    "eio": ({"cycles": 2, "fault_s": 1.0}, {"cycles": 40, "fault_s": 1.0}),
    "disk_full": ({"cycles": 1, "full_s": 1.5}, {"cycles": 10, "full_s": 3.0}),
    "power_cut": ({"cycles": 1}, {"cycles": 20}),
}


@contextmanager
def small_tmpfs(mount: Path, size_mb: int = 24) -> Iterator[Path]:
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def bench_runs(workdir: Path, bench: bool = True, only: set[str] | None = None) -> Iterator[Figures]:
    """Run the scenarios (`only` names from SIZES) at bench (or CI) size, one Figures each."""
    size = {name: sizes[1 if bench else 0] for name, sizes in SIZES.items()}
    wanted = set(SIZES) if only is None else only
    workdir = Path(workdir)
    if wanted & {"partition", "lossy", "slow"}:
        with World(workdir / "wan") as world:
            if "partition" in wanted:
                yield run_partition(world, **size["partition"])
            if "lossy" in wanted:
                yield run_lossy(world, **size["lossy"])
            if "slow" in wanted:
                yield run_slow(world, **size["slow"])
    if "eio" in wanted:
        yield run_eio(workdir / "eio", **size["eio"])
    if "disk_full" in wanted:
        # Big enough that the cycles' own writes never fill it: the filler does, each cycle.
        with Broker(workdir / "full-broker") as broker, small_tmpfs(workdir / "full-disk", 256) as mount:
            yield run_disk_full(workdir / "full", mount, broker, **size["disk_full"])
    if "power_cut" in wanted:
        yield run_power_cut(workdir / "cut-on", fsync=True, **size["power_cut"])
        yield run_power_cut(workdir / "cut-off", fsync=False, **size["power_cut"])


def _median_max(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {max(values):.1f}" if values else "–"


def row(f: Figures) -> str:
    """One line of docs/reliability.md's table: cycles, written, lost, dup, gaps, recovery."""
    recovery = f.recovery_s or f.drain_s
    extra = []
    if f.detection_s:
        extra.append(f"detection {_median_max(f.detection_s)} s")
    if f.connect_attempts:
        extra.append(f"connect attempts per outage {max(f.connect_attempts)} max")
    if f.broker_connects:
        extra.append(f"broker CONNECTs per heal {max(f.broker_connects)} max")
    if f.acked_while_faulty or f.refused:
        extra.append(f"2xx while faulty {f.acked_while_faulty}, refused {f.refused}")
    if f.check_failures:
        extra.append(f"check FAILED {len(f.check_failures)}/{f.cycles}: {f.check_failures[0]}")
    return (f"| {f.scenario} | {f.cycles} | {f.events_written} | {f.events_lost} | {f.duplicates} | {f.gaps} "
            f"| {_median_max(recovery)} | {'; '.join(extra)} |")


def main() -> None:   # python -m tests.faults.net_bench [--ci] [name ...]
    import sys
    import tempfile
    args = sys.argv[1:]
    bench = "--ci" not in args
    only = {a for a in args if not a.startswith("--")} or None
    print("| scenario | cycles | events written | lost | dup | gaps | recovery s (median / max) | notes |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="faults2-") as tmp:
        for figures in bench_runs(Path(tmp), bench, only):
            print(row(figures), flush=True)


if __name__ == "__main__":
    main()
