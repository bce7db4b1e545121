"""Paced writes that remember every answer, and the checks that read them back.

    with PacedWriter(agent, events_per_s=200) as writer:   # a thread posting over the API
        ...                                                 # faults happen here
    writer.acked       # {command_id: (first_seq, last_seq)} of every 2xx answer
    writer.refused     # {status: count} of every non-2xx answer (5xx while storage is sick)
    lost_acked(db, writer.acked)    # the 2xx commands whose events the log does not hold (I1)
    Figures(scenario)               # one scenario's counts and timings, for the report
    integrity(path)                 # PRAGMA integrity_check of one database (I6)

The writer never retries a command: a refused or failed request is counted and the next
one gets a new command id, so every 2xx is one command the log must hold.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class PacedWriter:
    """Post `batch` received events every `batch / events_per_s` seconds from a thread."""

    def __init__(self, agent, events_per_s: float = 200.0, batch: int = 20, timeout: float = 5.0):
        self.agent, self.batch, self.timeout = agent, batch, timeout
        self.period = batch / events_per_s
        self.acked: dict[str, tuple[int, int]] = {}
        self.refused: dict[int, int] = {}
        self.reasons: dict[str, int] = {}
        self.errors = 0            # no answer at all (connection refused, reset, timed out)
        self._conn: http.client.HTTPConnection | None = None
        self._conn_url = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="paced-writer")

    def post_one(self) -> int:
        cid = str(uuid.uuid4())
        events = [{"type": "received", "sku": f"SKU-{i % 50}", "qty": 1 + i % 7} for i in range(self.batch)]
        try:
            status, body = self._post({"command_id": cid, "events": events})
        except (OSError, http.client.HTTPException, ValueError):
            self._drop()
            self.errors += 1
            return 0
        if 200 <= status < 300:
            self.acked[cid] = (body["first_seq"], body["last_seq"])
        else:
            self.refused[status] = self.refused.get(status, 0) + 1
            code = body.get("error", {}).get("code", "?") if isinstance(body, dict) else "?"
            self.reasons[code] = self.reasons.get(code, 0) + 1
        return status

    def _post(self, command: dict) -> tuple[int, object]:
        # One kept-alive connection (opened again when the agent's address changes or the
        # connection breaks): a connection per request leaves thousands of TIME-WAIT
        # sockets whose ports a later bind on this machine can no longer take.
        url = urllib.parse.urlsplit(self.agent.url)
        if self._conn is None or self._conn_url != self.agent.url:
            self._drop()
            self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)
            self._conn_url = self.agent.url
        headers = {"Content-Type": "application/json"}
        if self.agent.write_token:
            headers["Authorization"] = f"Bearer {self.agent.write_token}"
        self._conn.request("POST", "/v1/events", json.dumps(command), headers)
        resp = self._conn.getresponse()
        raw = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self._drop()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(raw) if "json" in ctype and raw else raw.decode(errors="replace"))

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self.post_one()
            due += self.period
            self._stop.wait(max(0.0, due - time.monotonic()))

    @property
    def events_acked(self) -> int:
        return sum(last - first + 1 for first, last in self.acked.values())

    def __enter__(self) -> "PacedWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self._drop()


@dataclass
class Figures:
    """One scenario's counts and timings, as docs/reliability.md reports them."""

    scenario: str
    cycles: int = 0
    events_written: int = 0
    events_lost: int = 0
    duplicates: int = 0
    gaps: int = 0
    detection_s: list[float] = field(default_factory=list)
    drain_s: list[float] = field(default_factory=list)
    connect_attempts: list[int] = field(default_factory=list)   # per outage, SYNs seen at the router
    broker_connects: list[int] = field(default_factory=list)    # CONNECTs the broker accepted per heal
    recovery_s: list[float] = field(default_factory=list)       # fault gone -> first 2xx write
    acked_while_faulty: int = 0                                 # 2xx answers while the storage failed
    refused: dict[int, int] = field(default_factory=dict)       # non-2xx answers by status
    check_failures: list[str] = field(default_factory=list)     # what the invariant check said, when it failed
    notes: list[str] = field(default_factory=list)


def lost_acked(db_path: Path, acked: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The acknowledged commands whose events are not all in the log at their seqs (I1)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        held = {}
        for cid, seq in conn.execute("SELECT command_id, seq FROM events"):
            low, high = held.get(cid, (seq, seq))
            held[cid] = (min(low, seq), max(high, seq))
        counts = dict(conn.execute("SELECT command_id, COUNT(*) FROM events GROUP BY command_id"))
    finally:
        conn.close()
    return {cid: span for cid, span in acked.items()
            if held.get(cid) != span or counts.get(cid) != span[1] - span[0] + 1}


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of the database at `path` ("ok" when it is sound)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()
