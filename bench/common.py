"""Helpers the benchmark scripts share: free ports and a pre-built log of N events."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from agent import events as ev
from agent.log import SqliteEventLog


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
