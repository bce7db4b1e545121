"""One contract suite per role of agent/ports.py, run against every implementation.

`EventLog`: all-or-none appends, idempotent retries, conflicts, listeners after commit,
group commit, close and reopen. `LogQueries`: stock, stock_as_of, all_stock, events_after.
Another implementation is one more entry in LOGS or QUERIES: a `Backend` says how to
open its log in a directory and how to read back its stored hash chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import msgspec
import pytest

from agent import events as ev
from agent.inventory import Refused, fold
from agent.log import SqliteEventLog
from agent.ports import EventLog, LogQueries
from agent.reader import LogReader
from agent.schema import GENESIS
from common.errors import StorageError

STORE = "store-1"


@dataclass(frozen=True)
class Backend:
    """How the contract opens one implementation of EventLog in a directory."""

    open_log: Callable[[Path], Awaitable[EventLog]]
    stored_chain: Callable[[Path], list[tuple[bytes, bytes]]]  # (body, hash) in seq order


@dataclass(frozen=True)
class Queries:
    """How the contract opens one implementation of LogQueries over a backend's log."""

    backend: Backend
    open: Callable[[Path], LogQueries]


async def _open_sqlite(directory: Path) -> SqliteEventLog:
    return await SqliteEventLog.open(directory / "events.db", STORE, checkpoint_every=5)


def _sqlite_chain(directory: Path) -> list[tuple[bytes, bytes]]:
    conn = sqlite3.connect(f"file:{directory / 'events.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT body, hash FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


SQLITE = Backend(_open_sqlite, _sqlite_chain)

LOGS = [pytest.param(SQLITE, id="SqliteEventLog")]
QUERIES = [pytest.param(Queries(SQLITE, lambda directory: LogReader(directory / "events.db")), id="LogReader")]


def cmd(command_id: str, *intents: dict) -> ev.AppendCommand:
    return ev.decode_command(msgspec.json.encode({"command_id": command_id, "events": list(intents)}))


def receive(sku: str = "A", qty: int = 10, location: str = "backroom") -> dict:
    return {"type": "received", "sku": sku, "qty": qty, "location": location}


def reserve(rid: str, qty: int = 1, sku: str = "A") -> dict:
    return {"type": "reserved", "sku": sku, "qty": qty, "reservation_id": rid}


def assert_chain_intact(chain: list[tuple[bytes, bytes]]) -> None:
    last = GENESIS
    for seq, (body, stored) in enumerate(chain, start=1):
        last = hashlib.sha256(last + body).digest()
        assert stored == last, f"hash chain broken at seq {seq}"


@pytest.fixture(params=LOGS)
def backend(request) -> Backend:
    return request.param


@pytest.fixture
async def log(backend, tmp_path):
    opened = await backend.open_log(tmp_path)
    yield opened
    await opened.close()


# ------------------------------------------------------------------ EventLog


async def test_command_with_a_refused_intent_appends_none_of_its_events(log):
    await log.append(cmd("c1", receive(qty=1)))
    with pytest.raises(Refused) as info:
        await log.append(cmd("c2", receive(qty=5), reserve("r", qty=7)))
    assert info.value.code == "insufficient_stock"
    assert log.last_seq == log.reader.last_seq() == 1
    assert log.reader.stock("A")["backroom"] == 1
    assert log.reader.events_after(1, 10) == []


async def test_accepted_command_appends_all_its_events_in_order(log):
    result = await log.append(cmd("c1", receive(qty=1), receive(sku="B", qty=2), reserve("r", qty=1)))
    assert (result.first_seq, result.last_seq, result.duplicate) == (1, 3, False)
    assert [e.seq for e in result.events] == [1, 2, 3]
    assert [ev.decode_event(body) for _, body in log.reader.events_after(0, 10)] == list(result.events)
    assert log.last_seq == 3


async def test_retry_with_the_same_body_answers_duplicate_with_the_same_seqs(log):
    first = await log.append(cmd("c1", receive(), receive(qty=2)))
    again = await log.append(cmd("c1", receive(), receive(qty=2)))
    assert (first.first_seq, first.last_seq, first.duplicate) == (1, 2, False)
    assert (again.first_seq, again.last_seq, again.duplicate) == (1, 2, True)
    assert log.last_seq == log.reader.last_seq() == 2
    assert log.reader.stock("A")["backroom"] == 12


async def test_same_command_id_with_another_body_is_refused_as_a_conflict(log):
    await log.append(cmd("c1", receive()))
    with pytest.raises(Refused) as info:
        await log.append(cmd("c1", receive(qty=3)))
    assert info.value.code == "command_conflict"
    assert log.last_seq == log.reader.last_seq() == 1
    assert log.reader.stock("A")["backroom"] == 10


async def test_refused_reservation_appends_nothing(log):
    await log.append(cmd("stock", receive(qty=2)))
    before = log.reader.stock("A")
    with pytest.raises(Refused) as info:
        await log.append(cmd("c-res", reserve("r1", qty=3)))
    assert info.value.code == "insufficient_stock"
    assert log.last_seq == log.reader.last_seq() == 1
    assert log.reader.stock("A") == before
    # Nothing of it was recorded either: the same command_id is free for a command that fits.
    assert (await log.append(cmd("c-res", reserve("r1", qty=2)))).first_seq == 2


async def test_listeners_are_called_after_commit_with_the_appended_events(log):
    calls = []
    log.add_listener(lambda events: calls.append(([e.seq for e in events], log.reader.last_seq(), log.last_seq)))
    await log.append(cmd("c1", receive(), receive(sku="B")))
    assert calls == [([1, 2], 2, 2)]  # already readable and counted when the listener runs
    await log.append(cmd("c1", receive(), receive(sku="B")))  # duplicate: nothing appended
    with pytest.raises(Refused):
        await log.append(cmd("c2", reserve("r", qty=99)))
    assert calls == [([1, 2], 2, 2)]


async def test_a_failing_listener_does_not_stop_the_log(log):
    def broken(events):
        raise RuntimeError("listener bug")

    log.add_listener(broken)
    calls = []
    log.add_listener(calls.append)
    await log.append(cmd("c1", receive()))
    assert (await log.append(cmd("c2", receive()))).first_seq == 2
    assert [[e.seq for e in events] for events in calls] == [[1], [2]]


async def test_concurrent_appends_each_get_their_own_answer(backend, log, tmp_path):
    await log.append(cmd("stock", receive(qty=50)))
    await log.append(cmd("taken", reserve("res-taken")))
    jobs = [log.append(cmd(f"r{i}", reserve(f"res{i}"))) for i in range(80)]
    jobs += [log.append(cmd("taken", reserve("res-taken"))), log.append(cmd("stock", receive(qty=1)))]
    *reservations, retry, conflict = await asyncio.gather(*jobs, return_exceptions=True)
    accepted = [r for r in reservations if not isinstance(r, BaseException)]
    refused = [r for r in reservations if isinstance(r, Refused)]
    assert len(accepted) == 49 and len(refused) == 31
    assert all(r.code == "insufficient_stock" for r in refused)
    assert sorted(r.first_seq for r in accepted) == list(range(3, 52))
    assert all(r.first_seq == r.last_seq and [e.seq for e in r.events] == [r.first_seq] for r in accepted)
    assert (retry.first_seq, retry.duplicate) == (2, True)
    assert isinstance(conflict, Refused) and conflict.code == "command_conflict"
    assert log.last_seq == 51 and log.reader.stock("A")["reserved"] == 50
    assert_chain_intact(backend.stored_chain(tmp_path))


async def test_close_finishes_queued_appends(backend, tmp_path):
    log = await backend.open_log(tmp_path)
    tasks = [asyncio.ensure_future(log.append(cmd(f"c{i}", receive(qty=1)))) for i in range(30)]
    await asyncio.sleep(0)  # every append is queued before close
    await log.close()
    assert sorted(t.result().first_seq for t in tasks) == list(range(1, 31))
    with pytest.raises(StorageError):
        await log.append(cmd("late", receive()))
    reopened = await backend.open_log(tmp_path)
    try:
        assert reopened.last_seq == 30
    finally:
        await reopened.close()


async def test_reopen_keeps_the_last_seq_and_the_hash_chain(backend, tmp_path):
    log = await backend.open_log(tmp_path)
    await log.append(cmd("c1", receive(), receive(sku="B")))
    await log.append(cmd("c2", reserve("r", qty=3)))
    await log.close()
    log = await backend.open_log(tmp_path)
    try:
        assert log.last_seq == log.reader.last_seq() == 3
        assert (await log.append(cmd("c1", receive(), receive(sku="B")))).duplicate  # idempotency survives
        assert (await log.append(cmd("c3", receive(sku="B", qty=1)))).first_seq == 4
        assert log.reader.stock("B")["backroom"] == 11
    finally:
        await log.close()
    chain = backend.stored_chain(tmp_path)
    assert len(chain) == 4
    assert_chain_intact(chain)


async def test_projection_checkpoint_answers_the_last_seq(log):
    await log.append(cmd("c1", receive(), receive(sku="B")))
    assert await log.checkpoint_projection() == 2
    assert await log.checkpoint_projection() == 2  # nothing changed since: a no-op
    assert log.reader.stock_as_of("A", 2) == log.reader.stock("A")


# ---------------------------------------------------------------- LogQueries


@pytest.fixture(params=QUERIES)
async def filled(request, tmp_path):
    """A log written through its backend and a LogQueries opened on it: (log, queries)."""
    impl: Queries = request.param
    log = await impl.backend.open_log(tmp_path)
    queries = impl.open(tmp_path)
    yield log, queries
    queries.close()
    await log.close()


async def test_stock_of_an_unseen_sku_is_none_and_available_never_negative(filled):
    log, queries = filled
    assert queries.last_seq() == 0 and queries.stock("A") is None
    await log.append(cmd("c1", receive(qty=2, location="floor"), receive(qty=3), reserve("r", qty=4)))
    await log.append(cmd("c2", {"type": "sold", "sku": "A", "qty": 2, "location": "floor"}))
    assert queries.stock("A") == {"sku": "A", "floor": 0, "backroom": 3, "reserved": 4, "available": 0,
                                  "last_seq": 4}
    assert queries.stock("B") is None and queries.last_seq() == 4


async def test_stock_as_of_equals_the_fold_of_each_prefix(filled):
    log, queries = filled
    intents = [receive(qty=10), {"type": "sold", "sku": "A", "qty": 3, "location": "backroom"},
               {"type": "moved", "sku": "A", "qty": 4, "from": "backroom", "to": "floor"},
               receive(sku="B", qty=1), {"type": "counted", "sku": "A", "location": "floor", "counted": 9},
               reserve("r", qty=2),
               {"type": "adjusted", "sku": "A", "location": "floor", "delta": -1, "reason": "damaged"},
               {"type": "reservation_fulfilled", "reservation_id": "r"}]
    await log.append(cmd("early", receive(sku="Z", qty=2)))  # then never again: its last checkpoint is old
    for round_ in range(4):
        for i, intent in enumerate(intents):
            if intent["type"].startswith("reserv"):
                intent = {**intent, "reservation_id": f"r{round_}"}
            await log.append(cmd(f"c{round_}-{i}", intent))
        await log.checkpoint_projection()
    events = [ev.decode_event(body) for _, body in queries.events_after(0, 1000)]
    assert len(events) == 33
    for n in range(1, len(events) + 1):
        state = fold(STORE, events[:n])
        for sku in ("A", "B", "Z"):
            row, got = state.stock.get(sku), queries.stock_as_of(sku, n)
            if row is None:
                assert got is None, (sku, n)
                continue
            assert (got["floor"], got["backroom"], got["reserved"], got["last_seq"]) == (
                row.floor, row.backroom, row.reserved, row.last_seq), (sku, n)
    assert queries.stock_as_of("B", 3) is None
    assert queries.stock_as_of("A", len(events)) == queries.stock("A")


async def test_all_stock_pages_in_sku_order(filled):
    log, queries = filled
    await log.append(cmd("c1", *(receive(sku=sku, qty=i + 1) for i, sku in enumerate(["C", "A", "E", "B", "D"]))))
    assert [row["sku"] for row in queries.all_stock()] == ["A", "B", "C", "D", "E"]
    page = queries.all_stock(after_sku="B", limit=2)
    assert [(row["sku"], row["backroom"]) for row in page] == [("C", 1), ("D", 5)]
    assert queries.all_stock(after_sku="E") == []
    assert queries.all_stock()[0] == queries.stock("A")


async def test_events_after_answers_bodies_in_seq_order_within_the_limit(filled):
    log, queries = filled
    results = [await log.append(cmd(f"c{i}", receive(sku=f"S{i}", qty=i + 1))) for i in range(7)]
    appended = [e for r in results for e in r.events]
    rows = queries.events_after(2, 3)
    assert [seq for seq, _ in rows] == [3, 4, 5]
    assert [ev.decode_event(body) for _, body in rows] == appended[2:5]
    assert [body for _, body in rows] == [ev.encode(e) for e in appended[2:5]]
    assert [seq for seq, _ in queries.events_after(5, 100)] == [6, 7]
    assert queries.events_after(7, 100) == []
