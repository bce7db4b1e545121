"""A hub writer process for the contract suite: `python -m tests.hub.pg_writer URL SEED EVENTS STORE...`.

Opens its own PgStorage and writes every store's seqs 1..EVENTS as overlapping batches
in a shuffled order (some anchored, some not); prints each committed ack as a JSON line
`[store_id, acked_seq, rev]`.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from sync.hub.pg import PgStorage
from tests.hub.storage_support import NOW, incoming


def plan(seed: int, events: int, stores: list[str]) -> list[list]:
    """Groups of batches: each store's 1..events cut into overlapping pieces, shuffled."""
    rng = random.Random(seed)
    batches = []
    for store_id in stores:
        at = 1
        while at <= events:
            last = min(events, at + rng.randint(0, 7))
            batches.append(incoming(max(1, at - rng.randint(0, 2)), last, store_id, anchored=rng.random() < 0.7))
            at = last + 1
    rng.shuffle(batches)
    groups = []
    while batches:
        take = rng.randint(1, 4)
        groups.append(batches[:take])
        batches = batches[take:]
    return groups


async def main(url: str, seed: int, events: int, stores: list[str]) -> None:
    storage = await PgStorage.open(url, stores, pool_size=2)
    try:
        for group in plan(seed, events, stores):
            results = await storage.write(group, NOW)
            for store_id, ack in sorted(results.acks.items()):
                print(json.dumps([store_id, ack.acked_seq, ack.rev]), flush=True)
        # The last batches may have come before a gap filled by the other writer: resend all once more.
        for group in plan(seed + 1, events, stores):
            results = await storage.write(group, NOW)
            for store_id, ack in sorted(results.acks.items()):
                print(json.dumps([store_id, ack.acked_seq, ack.rev]), flush=True)
    finally:
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
