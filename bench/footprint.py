"""Benchmark: the memory of the store's processes (agent, sync) and the agent's cold start.

    .venv/bin/python bench/footprint.py [--big 1000000] [--load-s 20] [--tree PATH] [--workdir DIR]

The agent runs as systemd/edge-agent.service starts it: `edge-agent run --config F` in "/",
MALLOC_ARENA_MAX=2 (the unit's Environment=), normal priority; it starts its sync process
itself. The broker and the hub stand for the central side, under `nice -n 19`.
1. Build two agent logs, of 1,000 and of `--big` events, with the tree's code (not timed).
2. Cold start: `edge-agent run` (sync off) with NOTIFY_SOCKET on a datagram socket we
   bind; the time from spawn to the READY=1 datagram, median of 5 alternating rounds.
3. Footprint on the big log with sync on (a private mosquitto and `edge-hub run`): once
   the backlog is at the hub and 5 s more (idle), each process's RSS and PSS
   (/proc/PID/smaps_rollup) and their sums; then under steady load for `--load-s`
   seconds: kiosk reads (GET /v1/availability/{sku}, 100/s), writes (POST /v1/events, 20
   commands/s of 5 events) and the sync process shipping them to the hub, sampled every
   0.25 s: each figure's peak, and the sample with the highest sum of PSS. Beside them,
   "unique": the physical pages the two processes map, each counted once (pagemap; PSS
   instead divides a page shared with any process, the hub's interpreter included).
Prints a JSON summary and the verdict against the targets (sum of PSS < 80 MiB; the agent
alone < 64 MiB; start to READY < 1.5 s for both logs and within 20% of each other).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (STORE_ENV, Overlap, Tree, bench_lock, children, free_port,  # noqa: E402
                          rollup_kib, scheduling, unique_kib, wait_quiet)

STORE = "store-0042"
BIN = Path(sys.executable).parent
SKUS = 5000
CENTRAL = ["nice", "-n", "19"]
MIB = 1024


def write_config(path: Path, db: Path, api_port: int, mqtt_port: int, sync: bool) -> None:
    path.write_text(
        f'[store]\nid = "{STORE}"\n[storage]\npath = "{db}"\n[api]\nport = {api_port}\n'
        f'[mqtt]\nport = {mqtt_port}\nreconnect_min_s = 0.1\n'
        f'[sync]\nenabled = {"true" if sync else "false"}\n'
        '[service]\nbackup_interval_s = 0\n[log]\nformat = "text"\n')


def start_agent(tree: Tree, config: Path, out: Path, notify_path: Path) -> tuple[subprocess.Popen, float]:
    """Spawn the agent; return it and the seconds from spawn to READY=1."""
    notify_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(60)
    t0 = time.perf_counter()
    proc = subprocess.Popen(tree.agent_argv(config), env=tree.env(NOTIFY_SOCKET=str(notify_path)), cwd="/",
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while True:
            if b"READY=1" in sock.recv(65536).split(b"\n"):
                return proc, time.perf_counter() - t0
    except BaseException:
        proc.kill()
        raise
    finally:
        sock.close()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


class Load:
    """Steady kiosk reads and writes from threads, at fixed rates."""

    def __init__(self, port: int, reads_per_s: float, writes_per_s: float):
        self.port = port
        self.rates = (reads_per_s, writes_per_s)
        self.stop = threading.Event()
        self.counts = {"reads": 0, "writes": 0, "errors": 0}
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in ("reads", "writes")]

    def _run(self, kind: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        period = 1 / self.rates[0 if kind == "reads" else 1]
        nxt, i = time.monotonic(), 0
        while not self.stop.is_set():
            i += 1
            try:
                if kind == "reads":
                    conn.request("GET", f"/v1/availability/SKU-{i % SKUS}")
                else:
                    body = json.dumps({"command_id": str(uuid.uuid4()), "events": [
                        {"type": "sold", "sku": f"SKU-{(i * 5 + k) % SKUS}", "qty": 1} for k in range(5)]})
                    conn.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.counts[kind if resp.status < 300 else "errors"] += 1
            except OSError:
                self.counts["errors"] += 1
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        return self.counts


def sample(agent_pid: int) -> dict[str, dict[str, int]]:
    """RSS, PSS and private pages (KiB) of the agent and of its sync process(es), and sums."""
    procs = {"agent": [agent_pid], "sync": children(agent_pid)}
    out: dict[str, dict[str, int]] = {}
    for name, pids in procs.items():
        rolls = [rollup_kib(p) for p in pids]
        out[name] = {"rss": sum(r["Rss"] for r in rolls), "pss": sum(r["Pss"] for r in rolls),
                     "private": sum(r["Private_Clean"] + r["Private_Dirty"] for r in rolls)}
    out["sum"] = {k: out["agent"][k] + out["sync"][k] for k in ("rss", "pss", "private")}
    out["pids"] = {"agent": agent_pid, "sync": procs["sync"]}
    return out


def mib(snapshot: dict[str, dict[str, int]]) -> dict:
    return {name: {k: round(v / MIB, 1) for k, v in figures.items()} for name, figures in snapshot.items()
            if name != "pids"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--load-s", type=float, default=20)
    parser.add_argument("--tree", default=str(ROOT),
                        help="the source tree whose edge-agent is measured, with its own .venv (default: this one)")
    parser.add_argument("--wait-quiet", type=float, default=120,
                        help="wait up to this many seconds for no pytest or other bench before measuring")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    tree = Tree(Path(args.tree).resolve())
    tree.check()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="footprint-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with bench_lock():
        return run(args, tree, work)


def run(args, tree: Tree, work: Path) -> int:
    procs: list[subprocess.Popen] = []
    result: dict = {"tree": str(tree.root), "commit": tree.label(), "big": args.big, "env": STORE_ENV,
                    "command": " ".join(tree.agent_argv(work / "agent-load.toml"))}
    try:
        logs = {}
        for n in (1000, args.big):
            db = work / f"log-{n}" / "events.db"
            if not db.exists():
                print(f"building a log of {n} events ...", flush=True)
                t = time.perf_counter()
                tree.build_log(db, STORE, n, SKUS)
                print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
            logs[n] = db
        result["waited_for_quiet_s"] = wait_quiet(args.wait_quiet)
        overlap = Overlap()

        # Rounds alternate between the logs, so a busy moment on the box hits both alike.
        runs: dict[int, list[float]] = {n: [] for n in logs}
        for _ in range(5):
            for n, db in logs.items():
                config = work / f"agent-{n}.toml"
                write_config(config, db, free_port(), 1883, sync=False)
                proc, seconds = start_agent(tree, config, work / "agent.out", work / "notify.sock")
                procs.append(proc)
                runs[n].append(seconds)
                stop(proc)
                procs.remove(proc)
        for n, times in runs.items():
            result[f"start_to_ready_s_{n}"] = round(statistics.median(times), 3)
            result[f"start_to_ready_runs_{n}"] = [round(t, 3) for t in times]

        mqtt_port = free_port()
        (work / "mosquitto.conf").write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([*CENTRAL, mosquitto, "-c", str(work / "mosquitto.conf")],
                                      stdout=open(work / "mosquitto.out", "ab"), stderr=subprocess.STDOUT))
        time.sleep(0.5)
        hub_db = work / "hub" / "hub.db"
        shutil.rmtree(hub_db.parent, ignore_errors=True)
        (work / "hub.toml").write_text(
            f'[[stores]]\nid = "{STORE}"\n[storage]\npath = "{hub_db}"\n[mqtt]\nport = {mqtt_port}\n'
            '[log]\nformat = "text"\n')
        procs.append(subprocess.Popen([*CENTRAL, str(BIN / "edge-hub"), "run", "--config", str(work / "hub.toml")],
                                      stdout=open(work / "hub.out", "ab"), stderr=subprocess.STDOUT))
        # The big log's sync state starts over each run (sync.db and the like): the hub is new.
        big_dir = logs[args.big].parent
        for extra in big_dir.iterdir():
            if extra.name.startswith("events.") and not extra.name.startswith("events.db"):
                extra.unlink()
        api_port = free_port()
        config = work / "agent-load.toml"
        write_config(config, logs[args.big], api_port, mqtt_port, sync=True)
        agent, _ = start_agent(tree, config, work / "agent.out", work / "notify.sock")
        procs.append(agent)
        # Let the sync process drain the backlog to the hub first: steady state, not the catch-up.
        conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
        deadline = time.monotonic() + 900
        t_catch = time.monotonic()
        while time.monotonic() < deadline:
            conn.request("GET", "/v1/sync")
            sync = json.loads(conn.getresponse().read())
            if sync["backlog"] == 0 and sync["acked_seq"] >= args.big:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the backlog never drained: {sync}")
        result["catch_up_s"] = round(time.monotonic() - t_catch, 1)
        time.sleep(5)
        idle = sample(agent.pid)
        result["scheduling"] = {"agent": scheduling(agent.pid),
                                "sync": [scheduling(p) for p in idle["pids"]["sync"]]}
        result["idle_mib"] = mib(idle)
        result["idle_unique_mib"] = round(unique_kib([agent.pid, *idle["pids"]["sync"]]) / MIB, 1)

        load = Load(api_port, reads_per_s=100, writes_per_s=20).start()
        peak = {name: {k: 0 for k in ("rss", "pss", "private")} for name in ("agent", "sync", "sum")}
        at_peak, end = idle, time.monotonic() + args.load_s
        while time.monotonic() < end:
            now = sample(agent.pid)
            for name in peak:
                for k in peak[name]:
                    peak[name][k] = max(peak[name][k], now[name][k])
            if now["sum"]["pss"] > at_peak["sum"]["pss"]:
                at_peak = now
            time.sleep(0.25)
        result["load_unique_mib"] = round(unique_kib([agent.pid, *children(agent.pid)]) / MIB, 1)
        result["load_peak_mib"] = mib(peak)
        result["load_at_peak_sum_pss_mib"] = mib(at_peak)
        result["load_counts"] = load.finish()
        conn.request("GET", "/v1/sync")
        result["sync_after_load"] = json.loads(conn.getresponse().read())
        result["others_running"] = overlap.stop()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    small, big = result["start_to_ready_s_1000"], result[f"start_to_ready_s_{args.big}"]
    peak_mib = result["load_peak_mib"]
    result["verdict"] = {
        "sum_of_pss_under_load_below_80_mib": peak_mib["sum"]["pss"] < 80,
        "agent_rss_under_load_below_64_mib": peak_mib["agent"]["rss"] < 64,
        "agent_pss_under_load_below_64_mib": peak_mib["agent"]["pss"] < 64,
        "start_below_1_5_s": max(small, big) < 1.5,
        "start_within_20_percent": abs(big - small) <= 0.2 * min(small, big),
    }
    print(json.dumps(result, indent=2))
    return 0 if all(result["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
