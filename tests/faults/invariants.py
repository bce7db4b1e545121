"""I1..I6 after a fault, counted into a Figures and then asserted (issue 17).

    sampler = AckSampler(agent, hub).start()     # I5 during the run: cursor <= hub's ack
    with PacedWriter(agent) as writer:           # tests/faults/net_load.py
        ...                                      # faults happen here
    check_invariants(agent, hub, writer, figures, sampler=sampler)

- I1 every 2xx the writer got is in the agent's log, by command id and seqs (lost_acked);
- I2 no event twice at the hub: by (store, seq), by event id, and by command id (a command
  holds at the hub exactly the events the log holds for it);
- I3 the hub holds 1..H gapless, H the log's last seq;
- I4 `edge-agent verify` passes (the projection equals a replay, the chain holds);
- I5 the sampler never saw the agent's cursor beyond the hub's ack (the agent's is read
  first, the hub's after: the hub's ack only grows, so a cursor read earlier must not
  exceed it), and once healed cursor == hub ack == H;
- I6 `PRAGMA integrity_check` is ok on events.db, sync.db and hub.db.

Every count goes into the Figures first (lost, duplicates, gaps, check_failures), then one
AssertionError names everything that failed, so a bench run can record a failure and go on.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from tests.faults.net_load import Figures, integrity, lost_acked
from tests.sync.agents import agent_cli, wait_synced
from tests.sync.helpers import STORE


def sync_db_of(agent) -> Path:
    return agent.db_path.with_name(agent.db_path.stem + ".sync.db")


def hub_acked(hub, store: str = STORE) -> int:
    """The hub's ack for `store` from hub.db (read-only; 0 before the store's first batch)."""
    conn = sqlite3.connect(f"file:{hub.db_path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT acked_seq FROM stores WHERE store_id = ?", (store,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else 0


class AckSampler:
    """A thread comparing the agent's cursor (GET /v1/sync) with the hub's ack (hub.db).

    `pause()` around a fault that legitimately moves the hub's ack back (its database
    swapped for an older copy) until the agent has rewound, then `resume()`.
    """

    def __init__(self, agent, hub, period: float = 0.05):
        self.agent, self.hub, self.period = agent, hub, period
        self.samples = 0
        self.violations: list[tuple[int, int]] = []     # (agent cursor, hub ack) with cursor > ack
        self._stop, self._paused = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ack-sampler")

    def start(self) -> "AckSampler":
        self._thread.start()
        return self

    def pause(self) -> None:
        self._paused.set()
        time.sleep(self.period * 3)       # a sample under way finishes before the fault

    def resume(self) -> None:
        self._paused.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if self._paused.is_set():
                continue
            try:
                status, body = self.agent.request("GET", "/v1/sync", timeout=2)
                if status != 200:
                    continue
                cursor = body["acked_seq"]
                if self._paused.is_set():
                    continue
                ack = hub_acked(self.hub)
            except (OSError, sqlite3.Error, KeyError, ValueError):
                continue                  # the agent is down or restarting, hub.db being replaced
            if self._paused.is_set():
                continue
            self.samples += 1
            if cursor > ack:
                self.violations.append((cursor, ack))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def __enter__(self) -> "AckSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _log_commands(db_path: Path) -> Counter:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return Counter(dict(conn.execute("SELECT command_id, COUNT(*) FROM events GROUP BY command_id")))
    finally:
        conn.close()


def check_invariants(agent, hub, writer, figures: Figures | None = None, *, sampler: AckSampler | None = None,
                     acked: dict[str, tuple[int, int]] | None = None, verify: bool = True,
                     heal_timeout: float = 60.0) -> int:
    """Wait until healed, count I1..I6 into `figures`, raise one AssertionError naming every failure.

    `writer` is a PacedWriter (its `.acked`), or None with `acked` given. Returns H.
    """
    figures = figures if figures is not None else Figures("check")
    acked = dict(writer.acked if writer is not None else {}) | dict(acked or {})
    if sampler is not None:
        sampler.stop()
    failures: list[str] = []
    status = wait_synced(agent, heal_timeout)
    last = status["last_seq"]

    lost = lost_acked(agent.db_path, acked)                                          # I1
    figures.events_lost += sum(b - a + 1 for a, b in lost.values())
    if lost:
        failures.append(f"I1: {len(lost)} acknowledged commands not in the log: {sorted(lost.items())[:3]}")

    events = hub.export(STORE)                                                        # I2, I3
    seqs = Counter(e["seq"] for e in events)
    ids = Counter(e["event_id"] for e in events)
    at_hub = Counter(e["command_id"] for e in events)
    in_log = _log_commands(agent.db_path)
    dup_seq = sum(n - 1 for n in seqs.values() if n > 1)
    dup_id = sum(n - 1 for n in ids.values() if n > 1)
    dup_cmd = sum(max(0, n - in_log.get(cid, 0)) for cid, n in at_hub.items())
    duplicates = max(dup_seq, dup_id, dup_cmd)
    figures.duplicates += duplicates
    if duplicates:
        failures.append(f"I2: twice at the hub: {dup_seq} by seq, {dup_id} by event id, {dup_cmd} by command id")
    held = set(seqs)
    gaps = sum(1 for s in range(1, (max(held) if held else 0) + 1) if s not in held)
    figures.gaps += gaps
    if gaps or (max(held) if held else 0) != last:
        failures.append(f"I3: hub holds {len(held)} seqs up to {max(held) if held else 0} with {gaps} gaps;"
                        f" the log ends at {last}")

    if verify:                                                                        # I4
        done = agent_cli(agent, "verify")
        if done.returncode != 0:
            failures.append(f"I4: verify failed: {(done.stdout + done.stderr).decode()[-500:]}")

    hub_ack = hub.stats()["stores"][STORE]["acked_seq"]                               # I5
    if sampler is not None and sampler.violations:
        failures.append(f"I5: cursor beyond the hub's ack in {len(sampler.violations)} of {sampler.samples}"
                        f" samples, e.g. {sampler.violations[:3]}")
    if not (status["acked_seq"] == hub_ack == last):
        failures.append(f"I5: healed cursor {status['acked_seq']}, hub ack {hub_ack}, log end {last}")

    for path in (agent.db_path, sync_db_of(agent), hub.db_path):                      # I6
        result = integrity(path)
        if result != "ok":
            failures.append(f"I6: integrity_check of {path.name}: {result}")

    figures.events_written += sum(b - a + 1 for a, b in acked.values())
    figures.check_failures.extend(failures)
    assert not failures, "\n".join(failures)
    return last
