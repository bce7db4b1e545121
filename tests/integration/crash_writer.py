"""A writer process for the crash test: appends deterministic commands with 8 concurrent
workers and prints `ok K FIRST LAST DUP` after each append returns (i.e. committed).

usage: python -m tests.integration.crash_writer DB START [RETRY,K,...]
Command K's body is a pure function of K, so a retry after a crash sends the same body.
"""

import asyncio
import random
import sys

import msgspec

from agent import events as ev
from agent.log import SqliteEventLog


def command(k: int) -> ev.AppendCommand:
    rng = random.Random(k)
    intents = [{"type": "received", "sku": f"SKU-{rng.randrange(20)}", "qty": rng.randint(1, 9),
                "location": rng.choice(["floor", "backroom"])} for _ in range(rng.randint(1, 5))]
    if k % 7 == 3:
        intents.append({"type": "sold", "sku": intents[0]["sku"], "qty": 1})
    return ev.decode_command(msgspec.json.encode({"command_id": f"cmd-{k}", "events": intents}))


async def main(path: str, start: int, retry: list[int]) -> None:
    log = await SqliteEventLog.open(path, "crash-store", checkpoint_every=50)
    queue = list(retry)
    counter = start
    out = sys.stdout

    def take() -> int:
        nonlocal counter
        if queue:
            return queue.pop(0)
        counter += 1
        return counter - 1

    async def worker() -> None:
        while True:
            k = take()
            out.write(f"begin {k}\n")
            out.flush()
            result = await log.append(command(k))
            out.write(f"ok {k} {result.first_seq} {result.last_seq} {int(result.duplicate)}\n")
            out.flush()

    await asyncio.gather(*(worker() for _ in range(8)))


if __name__ == "__main__":
    retry = [int(x) for x in sys.argv[3].split(",") if x] if len(sys.argv) > 3 else []
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), retry))
