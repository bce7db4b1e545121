"""Concurrent writers: group commit through the single writer, each answered with its own seqs."""

from __future__ import annotations

import asyncio
import random

from agent.verify import verify_log

CLIENTS = 32
COMMANDS_PER_CLIENT = 12


def command(client: int, n: int) -> dict:
    rnd = random.Random(client * 1000 + n)
    sku = f"SKU-{rnd.randrange(8)}"
    events = [{"type": "received", "sku": sku, "qty": rnd.randint(1, 9)}]
    for _ in range(rnd.randrange(3)):
        events.append({"type": "sold", "sku": sku, "qty": rnd.randint(1, 3)})
    # Shared ids: clients 0-3 all send command "shared-n" with the same body at once.
    cid = f"shared-{n}" if client < 4 else f"c{client}-{n}"
    if client < 4:
        events = [{"type": "received", "sku": "SHARED", "qty": n + 1}]
    return {"command_id": cid, "events": events}


async def test_32_concurrent_clients_with_retries_get_every_event_exactly_once(agent):
    answers: dict[str, list[tuple[int, dict]]] = {}
    sent: dict[str, dict] = {}
    start = asyncio.Event()

    async def client(i: int) -> None:
        await start.wait()
        for n in range(COMMANDS_PER_CLIENT):
            body = command(i, n)
            sent[body["command_id"]] = body
            # Every third command is retried at once, as a client does after a lost answer.
            tries = 2 if n % 3 == 0 else 1
            results = await asyncio.gather(*(agent.post(body) for _ in range(tries)))
            answers.setdefault(body["command_id"], []).extend(results)

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    start.set()
    await asyncio.gather(*tasks)

    total = 0
    spans = {}
    for cid, results in answers.items():
        statuses = sorted(status for status, _ in results)
        assert statuses.count(201) == 1, (cid, results)
        assert set(statuses) <= {200, 201}, (cid, results)
        seqs = {(a["first_seq"], a["last_seq"]) for _, a in results}
        assert len(seqs) == 1, f"{cid} answered with different seqs: {results}"
        assert all(a["duplicate"] == (s == 200) for s, a in results)
        first, last = seqs.pop()
        assert last - first + 1 == len(sent[cid]["events"])
        spans[cid] = (first, last)
        total += last - first + 1

    assert agent.last_seq == total
    _, page = await agent.get("/v1/events?limit=1000")
    events = page["events"]
    assert [e["seq"] for e in events] == list(range(1, total + 1))
    for cid, (first, last) in spans.items():
        mine = [e for e in events if e["command_id"] == cid]
        assert [e["seq"] for e in mine] == list(range(first, last + 1)), cid
        assert [(e["type"], e["sku"], e["qty"]) for e in mine] == [
            (i["type"], i["sku"], i["qty"]) for i in sent[cid]["events"]], cid

    report = verify_log(agent.db_path)
    assert report.ok, report.problems
    shared = (await agent.get("/v1/stock/SHARED"))[1]
    assert shared["backroom"] == sum(n + 1 for n in range(COMMANDS_PER_CLIENT))


async def test_concurrent_refusals_leave_other_writers_untouched(agent):
    await agent.post({"command_id": "seed", "events": [{"type": "received", "sku": "R", "qty": 10, "location": "floor"}]})

    async def reserve(i: int):
        return await agent.post({"command_id": f"r{i}", "events": [
            {"type": "reserved", "sku": "R", "qty": 3, "reservation_id": f"res-{i}"}]})

    results = await asyncio.gather(*(reserve(i) for i in range(10)))
    ok = [a for s, a in results if s == 201]
    refused = [a for s, a in results if s == 409]
    assert len(ok) == 3 and len(refused) == 7, results
    assert all(a["error"]["code"] == "insufficient_stock" for a in refused)
    assert (await agent.get("/v1/stock/R"))[1]["reserved"] == 9
    assert agent.last_seq == 4
    assert verify_log(agent.db_path).ok
