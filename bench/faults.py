"""Benchmark: the fault-injection scenarios of tests/faults/ with more cycles, and their figures.

    sudo .venv/bin/python bench/faults.py [--kill-cycles 120] [--cycles 10] [--faults2 bench|ci|none]
                                          [--only NAME ...] [--seed 1] [--workdir DIR] [--write-docs]

Runs scenarios 1..9 (docs/reliability.md), each with its own broker, hub and agent, one after
the other; every run ends with the invariant check I1..I6 (tests/faults/invariants.py, or
the network and I/O runs' own check, the same invariants). Prints one table row per run:
cycles, events written (acknowledged), lost, duplicates, gaps, recovery median / max.
A run whose check fails is a row that says so, and the bench goes on.

- `--kill-cycles`: SIGKILLs of the agent, and again of the sync process (scenario 1), each;
- `--cycles`: cycles of the other kill, crash-point, freeze and clock runs (1..4, 7, 8);
  the broker and hub kills get twice as many;
- `--faults2`: scenarios 5, 6, 9 (tests/faults/net_bench.py) at its bench size, at CI size,
  or not at all;
- `--write-docs`: replace the table and the command line between the bench markers of
  docs/reliability.md (the rest of that file is prose kept by hand).

Root is needed for scenarios 5, 6, 9 (network namespaces, strace, tmpfs, a loop device).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import freeze_scenarios as freeze  # noqa: E402
from tests.faults import kill_scenarios as kills  # noqa: E402
from tests.faults import point_scenarios as points  # noqa: E402
from tests.faults.net_bench import bench_runs, row  # noqa: E402
from tests.faults.net_load import Figures  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- bench/faults.py: table -->", "<!-- /bench/faults.py -->"
HEADER = ("| scenario | cycles | events written | lost | dup | gaps | recovery s (median / max) | notes |\n"
          "|---|---|---|---|---|---|---|---|")
FAULTS2 = ("partition", "lossy", "slow", "eio", "disk_full", "power_cut")


def own_runs(kill_cycles: int, cycles: int, seed: int) -> list[tuple[str, Callable[[Path], Figures]]]:
    """(name, run(workdir)) for scenarios 1..4, 7, 8."""
    return [
        ("agent_kill", lambda d: kills.run_agent_kills(d, kill_cycles, seed=seed)),
        ("sync_kill", lambda d: kills.run_sync_kills(d, kill_cycles, seed=seed + 1)),
        ("agent_point", lambda d: points.run_agent_point(d, cycles, seed=seed + 2)),
        ("publish_point", lambda d: points.run_sync_point(d, "sync.after_publish", cycles, seed=seed + 3)),
        ("cursor_point", lambda d: points.run_sync_point(d, "sync.before_cursor_save", cycles, seed=seed + 4)),
        ("broker_kill", lambda d: kills.run_broker_kills(d, 2 * cycles, seed=seed + 5)),
        ("hub_kill", lambda d: kills.run_hub_kills(d, 2 * cycles, seed=seed + 6)),
        ("hub_swap", lambda d: kills.run_hub_swaps(d, cycles, seed=seed + 7)),
        ("freeze_agent", lambda d: freeze.run_freeze_agent(d, cycles)),
        ("freeze_sync", lambda d: freeze.run_freeze_sync(d, cycles)),
        ("clock", lambda d: freeze.run_clock_jumps(d, max(1, cycles // 3))),
    ]


def _failed(name: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"| {name} | – | – | – | – | – | – | RUN FAILED: {type(exc).__name__}: {first} |"


def runs(args, workdir: Path) -> Iterator[str]:
    for name, run in own_runs(args.kill_cycles, args.cycles, args.seed):
        if args.only and name not in args.only:
            continue
        (workdir / name).mkdir(parents=True)
        try:
            yield row(run(workdir / name))
        except Exception as exc:   # a failed check is a figure too: report it, go on
            traceback.print_exc()
            yield _failed(name, exc)
    if args.faults2 != "none":
        only = set(FAULTS2) & set(args.only) if args.only else None
        if only is None or only:
            (workdir / "faults2" / "full").mkdir(parents=True)   # run_disk_full's workdir is not made for it
            try:
                for f in bench_runs(workdir / "faults2", bench=args.faults2 == "bench", only=only):
                    yield row(f) + (" negative control: the loss is the expected result" if "fsync off" in f.scenario else "")
            except Exception as exc:
                traceback.print_exc()
                yield _failed("scenarios 5, 6, 9", exc)


def write_docs(table: str, command: str, took_s: float) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench/faults.py: {DOC} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = (f"{BEGIN}\nProduced by `{command}` ({took_s / 60:.0f} min,"
             f" {time.strftime('%Y-%m-%d', time.gmtime())}, a 2-core machine shared with other jobs):\n\n"
             f"{table}\n{END}")
    DOC.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-cycles", type=int, default=120)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--faults2", choices=("bench", "ci", "none"), default="bench")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    command = "sudo .venv/bin/python bench/faults.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-docs")
    start = time.monotonic()
    lines = [HEADER]
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-faults-", dir=args.workdir) as tmp:
        for line in runs(args, Path(tmp)):
            print(line, flush=True)
            lines.append(line)
    took = time.monotonic() - start
    print(f"took {took:.0f} s", flush=True)
    if args.write_docs:
        write_docs("\n".join(lines), command.strip(), took)
    failed = [line for line in lines[2:] if "FAILED" in line and "negative control" not in line]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
