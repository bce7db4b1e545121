"""Benchmark: the agent's memory footprint and its cold start to READY=1.

    .venv/bin/python bench/footprint.py [--big 1000000] [--load-s 20] [--workdir DIR]

1. Build two agent logs, of 1,000 and of `--big` events (not timed).
2. Cold start: `edge-agent run` (sync off) with NOTIFY_SOCKET on a datagram socket we
   bind; the time from spawn to the READY=1 datagram, median of 5 alternating rounds.
3. Footprint on the big log with sync on (a private mosquitto and `edge-hub run`):
   VmRSS 5 s after READY (idle), then under steady load for `--load-s` seconds: kiosk
   reads (GET /v1/availability/{sku}, 100/s), writes (POST /v1/events, 20 commands/s of
   5 events) and the uplink shipping them to the hub. Reports the peak VmRSS sampled
   every 0.25 s and the kernel's VmHWM, and the peak of the agent with its worker
   processes (its RSS plus each worker's private pages: tree_kib).
Prints a JSON summary and the verdict against the targets (RSS under load < 64 MiB;
start to READY < 1.5 s for both logs and within 20% of each other).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
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

from bench.common import build_log, free_port  # noqa: E402

STORE = "store-0042"
BIN = Path(sys.executable).parent
SKUS = 5000



def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        out[key.rstrip(":")] = int(value)
    return out


def tree_kib(pid: int) -> dict[str, dict[str, int]]:
    """The agent and its worker processes: each one's RSS and private (not shared) memory.

    The workers are forked from the agent (the sync worker) or spawned by it (the snapshot
    apply worker); pages a forked worker still shares with the agent are in the agent's
    RSS already, so the tree's memory is the agent's RSS plus each worker's private pages.
    """
    procs = {}
    for p in [pid, *_children(pid)]:
        try:
            roll = _rollup(p)
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        procs[f"{name}[{p}]"] = {"rss": roll["Rss"], "private": roll["Private_Clean"] + roll["Private_Dirty"]}
    return procs


def tree_total_kib(procs: dict[str, dict[str, int]]) -> int:
    first, *rest = procs.values()
    return first["rss"] + sum(p["private"] for p in rest)


def write_config(path: Path, db: Path, api_port: int, mqtt_port: int, sync: bool) -> None:
    path.write_text(
        f'[store]\nid = "{STORE}"\n[storage]\npath = "{db}"\n[api]\nport = {api_port}\n'
        f'[mqtt]\nport = {mqtt_port}\nreconnect_min_s = 0.1\n'
        f'[sync]\nenabled = {"true" if sync else "false"}\n'
        '[service]\nbackup_interval_s = 0\n[log]\nformat = "text"\n')


def start_agent(config: Path, out: Path, notify_path: Path) -> tuple[subprocess.Popen, float]:
    """Spawn the agent; return it and the seconds from spawn to READY=1."""
    notify_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "edge-agent"), "--config", str(config), "run"],
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if b"READY=1" in sock.recv(65536).split(b"\n"):
                return proc, time.perf_counter() - t0
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--load-s", type=float, default=20)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="footprint-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    result: dict = {"big": args.big}
    try:
        logs = {}
        for n in (1000, args.big):
            db = work / f"log-{n}" / "events.db"
            if not db.exists():
                print(f"building a log of {n} events ...", flush=True)
                t = time.perf_counter()
                asyncio.run(build_log(db, STORE, n, SKUS))
                print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
            logs[n] = db

        # Rounds alternate between the logs, so a busy moment on the box hits both alike.
        runs: dict[int, list[float]] = {n: [] for n in logs}
        for _ in range(5):
            for n, db in logs.items():
                config = work / f"agent-{n}.toml"
                write_config(config, db, free_port(), 1883, sync=False)
                proc, seconds = start_agent(config, work / "agent.out", work / "notify.sock")
                runs[n].append(seconds)
                stop(proc)
        for n, times in runs.items():
            result[f"start_to_ready_s_{n}"] = round(statistics.median(times), 3)
            result[f"start_to_ready_runs_{n}"] = [round(t, 3) for t in times]

        mqtt_port = free_port()
        (work / "mosquitto.conf").write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([mosquitto, "-c", str(work / "mosquitto.conf")],
                                      stdout=open(work / "mosquitto.out", "ab"), stderr=subprocess.STDOUT))
        time.sleep(0.5)
        hub_db = work / "hub" / "hub.db"
        shutil.rmtree(hub_db.parent, ignore_errors=True)
        (work / "hub.toml").write_text(
            f'[[stores]]\nid = "{STORE}"\n[storage]\npath = "{hub_db}"\n[mqtt]\nport = {mqtt_port}\n'
            '[log]\nformat = "text"\n')
        procs.append(subprocess.Popen([str(BIN / "edge-hub"), "run", "--config", str(work / "hub.toml")],
                                      stdout=open(work / "hub.out", "ab"), stderr=subprocess.STDOUT))
        api_port = free_port()
        config = work / "agent-load.toml"
        write_config(config, logs[args.big], api_port, mqtt_port, sync=True)
        agent, _ = start_agent(config, work / "agent.out", work / "notify.sock")
        procs.append(agent)
        # Let the uplink drain the backlog to the hub first: steady state, not the catch-up.
        conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            conn.request("GET", "/v1/sync")
            sync = json.loads(conn.getresponse().read())
            if sync["backlog"] == 0:
                break
            time.sleep(1)
        result["catch_up_peak_hwm_mib"] = round(rss_kib(agent.pid)["VmHWM"] / 1024, 1)
        time.sleep(5)
        result["rss_idle_mib"] = round(rss_kib(agent.pid)["VmRSS"] / 1024, 1)
        idle_tree = tree_kib(agent.pid)
        result["tree_idle_mib"] = round(tree_total_kib(idle_tree) / 1024, 1)
        load = Load(api_port, reads_per_s=100, writes_per_s=20).start()
        peak, tree_peak, tree_at_peak = 0, 0, idle_tree
        end = time.monotonic() + args.load_s
        while time.monotonic() < end:
            peak = max(peak, rss_kib(agent.pid)["VmRSS"])
            tree = tree_kib(agent.pid)
            if tree_total_kib(tree) > tree_peak:
                tree_peak, tree_at_peak = tree_total_kib(tree), tree
            time.sleep(0.25)
        result["tree_load_peak_mib"] = round(tree_peak / 1024, 1)
        result["tree_at_peak_mib"] = {name: {k: round(v / 1024, 1) for k, v in p.items()}
                                      for name, p in tree_at_peak.items()}
        result["load_counts"] = load.finish()
        conn.request("GET", "/v1/sync")
        result["sync_after_load"] = json.loads(conn.getresponse().read())
        result["rss_load_peak_mib"] = round(peak / 1024, 1)
        result["vm_hwm_mib"] = round(rss_kib(agent.pid)["VmHWM"] / 1024, 1)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    small, big = result["start_to_ready_s_1000"], result[f"start_to_ready_s_{args.big}"]
    result["verdict"] = {
        "rss_under_load_below_64_mib": result["rss_load_peak_mib"] < 64,
        "agent_with_workers_below_64_mib": result["tree_load_peak_mib"] < 64,
        "start_below_1_5_s": max(small, big) < 1.5,
        "start_within_20_percent": abs(big - small) <= 0.2 * min(small, big),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
