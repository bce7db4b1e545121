"""`edge-agent run` as a real process: SIGTERM, SIGKILL mid-burst, refusing an exposed API."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from agent.reader import LogReader
from agent.verify import verify_log
from tests.support.agentproc import AgentProcess, AgentStartError

WORKERS = 32


def body(cid: str) -> dict:
    n = sum(map(ord, cid))
    return {"command_id": cid, "events": [{"type": "received", "sku": f"S{n % 7}", "qty": n % 5 + 1},
                                          {"type": "sold", "sku": f"S{n % 7}", "qty": 1}]}


async def burst(url: str, answers: dict, unanswered: set, started: asyncio.Event, per_worker: int = 10_000):
    """Post commands from WORKERS clients until the server goes away; sort out who got answers."""

    async def worker(w: int, http: aiohttp.ClientSession) -> None:
        for n in range(per_worker):
            cid = f"w{w}-{n}"
            try:
                async with http.post(f"{url}/v1/events", json=body(cid)) as resp:
                    answers[cid] = (resp.status, await resp.json())
            except (aiohttp.ClientError, asyncio.TimeoutError):
                unanswered.add(cid)
                return
            if len(answers) >= 200:
                started.set()

    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(worker(w, http) for w in range(WORKERS)))


def commands_in_log(path) -> dict[str, list[int]]:
    reader = LogReader(path)
    try:
        seen: dict[str, list[int]] = {}
        for seq, raw in reader.events_after(0, 10_000_000):
            seen.setdefault(json.loads(raw)["command_id"], []).append(seq)
        return seen
    finally:
        reader.close()


async def test_sigterm_finishes_in_flight_writes_and_exits_0(tmp_path):
    agent = AgentProcess(tmp_path)
    await asyncio.to_thread(agent.start)
    answers: dict = {}
    unanswered: set = set()
    started = asyncio.Event()
    task = asyncio.create_task(burst(agent.url, answers, unanswered, started))
    await asyncio.wait_for(started.wait(), 30)
    agent.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(agent.proc.wait, 30)
    await task
    assert code == 0, agent.output()[-3000:]
    assert all(status == 201 for status, _ in answers.values()), "a request was answered with an error"
    in_log = commands_in_log(agent.db_path)
    for cid, (_, answer) in answers.items():
        assert in_log.get(cid) == [answer["first_seq"], answer["last_seq"]], cid
    # Requests cut off by the stop never reached a handler, so none of them was appended.
    assert not (unanswered & set(in_log))
    assert verify_log(agent.db_path).ok
    assert "log closed" in agent.output()


async def test_sigkill_mid_burst_then_retries_append_each_command_once(tmp_path):
    agent = AgentProcess(tmp_path)
    await asyncio.to_thread(agent.start)
    answers: dict = {}
    unanswered: set = set()
    started = asyncio.Event()
    task = asyncio.create_task(burst(agent.url, answers, unanswered, started))
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.to_thread(agent.kill)
    await task
    assert unanswered, "the kill should have cut some requests off"
    answered_before = dict(answers)

    await asyncio.to_thread(agent.start)
    retried: dict = {}
    async with aiohttp.ClientSession() as http:
        async def retry(cid: str, http=http) -> None:
            async with http.post(f"{agent.url}/v1/events", json=body(cid)) as resp:
                retried[cid] = (resp.status, await resp.json())
        # Every unanswered command, plus a sample of answered ones (a client that lost the answer).
        again = sorted(unanswered) + sorted(answered_before)[:50]
        await asyncio.gather(*(retry(cid) for cid in again))
    assert await asyncio.to_thread(agent.terminate) == 0

    in_log = commands_in_log(agent.db_path)
    for cid, (status, answer) in answered_before.items():
        assert status == 201
        assert in_log[cid] == [answer["first_seq"], answer["last_seq"]], f"{cid} lost or moved after the crash"
    for cid, (status, answer) in retried.items():
        assert status in (200, 201), (cid, answer)
        assert in_log[cid] == [answer["first_seq"], answer["last_seq"]], cid
        if cid in answered_before:
            assert status == 200 and answer["duplicate"] is True
    expected = set(answered_before) | set(retried)
    assert set(in_log) == expected, "each command exactly once, and nothing nobody sent"
    seqs = sorted(s for pair in in_log.values() for s in range(pair[0], pair[1] + 1))
    assert seqs == list(range(1, len(seqs) + 1))
    report = verify_log(agent.db_path)
    assert report.ok, report.problems


def test_exposed_api_without_token_refuses_to_start_saying_why(tmp_path):
    agent = AgentProcess(tmp_path, sections={"api": {"host": "0.0.0.0"}})
    try:
        agent.start(timeout=15)
    except AgentStartError as exc:
        message = str(exc)
    else:
        agent.kill()
        raise AssertionError("the agent started on 0.0.0.0 without a write token")
    assert agent.proc.returncode == 2
    assert "not loopback" in message and "write_token" in message
    assert not agent.db_path.exists(), "a refused start must not create the log"


def test_exposed_api_with_token_starts(tmp_path):
    with AgentProcess(tmp_path, write_token="tok", sections={"api": {"host": "0.0.0.0"}}) as agent:
        assert agent.request("GET", "/healthz") == (200, {"status": "ok"})
        assert agent.request("POST", "/v1/events", body("c1"), token="")[0] == 401
        assert agent.request("POST", "/v1/events", body("c1"))[0] == 201
        assert agent.terminate() == 0
