"""Reservation leases in the pure core, and the expiry job over an in-memory log with a fake clock.

No I/O and no sleeps: the job (agent.service.expire_leases) runs against `MemoryLog`, the
pure core behind the EventLog/LogQueries roles it uses, so any interleaving of
reservations, fulfilments, releases, clock jumps (forward and back) and job runs can be
generated.
"""

from __future__ import annotations

import asyncio
import itertools
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent import service
from agent.inventory import Inventory, Refused, decide_and_apply, ms_of, time_of
from agent.logstore import AppendResult, command_hash

T0 = ms_of("2026-12-03T10:00:00.000Z")


class MemoryLog:
    """An EventLog and its LogQueries over the pure core: idempotent by command_id, all or none."""

    def __init__(self, clock: list[int]):
        self.clock = clock
        self.state = Inventory("s1")
        self.events: list[ev.AnyEvent] = []
        self.commands: dict[str, tuple[bytes, int, int]] = {}
        counter = itertools.count(1)
        self.new_id = lambda: f"00000000-0000-7000-8000-{next(counter):012d}"

    @property
    def last_seq(self) -> int:
        return self.state.last_seq

    async def append(self, command: ev.AppendCommand) -> AppendResult:
        digest = command_hash(command)
        seen = self.commands.get(command.command_id)
        if seen is not None:
            if seen[0] != digest:
                raise Refused("command_conflict", "used with another body", "command_id")
            return AppendResult(command.command_id, seen[1], seen[2], True)
        decided = decide_and_apply(self.state, command, time_of(self.clock[0]), self.new_id)
        new = [event for event, _ in decided]
        self.events.extend(new)
        self.commands[command.command_id] = (digest, new[0].seq, new[-1].seq)
        return AppendResult(command.command_id, new[0].seq, new[-1].seq, False, tuple(new))

    def expired_leases(self, now: str, limit: int = 500) -> list[tuple[str, str]]:
        due = sorted((r.expires_at, r.reservation_id) for r in self.state.reservations.values()
                     if r.status == "open" and r.expires_at is not None and r.expires_at <= now)
        return [(rid, at) for at, rid in due[:limit]]


def context(clock: list[int]) -> types.SimpleNamespace:
    log = MemoryLog(clock)
    return types.SimpleNamespace(log=log, queries=log, now=lambda: time_of(clock[0]))


def reserve(rid: str, qty: int = 1, **lease) -> ev.AppendCommand:
    return ev.AppendCommand(f"res-{rid}", [ev.Reserve(sku="A", qty=qty, reservation_id=rid, **lease)])


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- decide


def test_ttl_sets_expires_at_from_the_agents_clock():
    ctx = context([T0])
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=5)])))
    result = run(ctx.log.append(reserve("r1", ttl_s=900)))
    assert result.events[0].expires_at == time_of(T0 + 900_000)
    assert ctx.log.state.reservations["r1"].expires_at == time_of(T0 + 900_000)
    # Without a lease the event carries no expires_at at all (old events read the same).
    plain = run(ctx.log.append(reserve("r2")))
    assert b"expires_at" not in ev.encode(plain.events[0])


def test_expires_at_in_the_past_is_refused_422_naming_it():
    ctx = context([T0])
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=5)])))
    with pytest.raises(Refused) as refusal:
        run(ctx.log.append(reserve("r1", expires_at=time_of(T0))))
    assert refusal.value.status == 422 and refusal.value.field == "events[0].expires_at"


def test_ttl_and_expires_at_together_do_not_decode():
    import msgspec

    body = (b'{"command_id": "c", "events": [{"type": "reserved", "sku": "A", "qty": 1, "reservation_id": "r",'
            b' "ttl_s": 60, "expires_at": "2026-12-03T11:00:00Z"}]}')
    with pytest.raises(msgspec.ValidationError) as error:
        ev.decode_command(body)
    assert ev.field_of(error.value) == "events[0].expires_at"


@pytest.mark.parametrize("intent", [ev.FulfilReservation(reservation_id="r1"),
                                    ev.ReleaseReservation(reservation_id="r1"),
                                    ev.ReleaseReservation(reservation_id="r1", reason="customer left")])
def test_closing_an_expired_lease_is_refused_409_lease_expired_before_the_job_ran(intent):
    clock = [T0]
    ctx = context(clock)
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=5)])))
    run(ctx.log.append(reserve("r1", ttl_s=60)))
    clock[0] += 60_000   # exactly at expires_at: expired
    with pytest.raises(Refused) as refusal:
        run(ctx.log.append(ev.AppendCommand("close", [intent])))
    assert refusal.value.code == "lease_expired" and refusal.value.field == "events[0].reservation_id"
    assert refusal.value.extra["expires_at"] == time_of(T0 + 60_000)
    assert ctx.log.state.reservations["r1"].status == "open"


def test_reason_expired_is_refused_before_the_lease_ends():
    ctx = context([T0])
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=5)])))
    run(ctx.log.append(reserve("r1", ttl_s=60)))
    run(ctx.log.append(reserve("r2")))
    for rid in ("r1", "r2"):
        with pytest.raises(Refused) as refusal:
            run(ctx.log.append(ev.AppendCommand(f"x-{rid}", [ev.ReleaseReservation(reservation_id=rid,
                                                                                  reason=ev.EXPIRED)])))
        assert refusal.value.code == "lease_not_expired" and refusal.value.field == "events[0].reason"


# ------------------------------------------------------------------ the job


def test_the_job_releases_an_expired_lease_once_with_reason_expired():
    clock = [T0]
    ctx = context(clock)
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=5)])))
    run(ctx.log.append(reserve("r1", qty=2, ttl_s=60)))
    assert run(service.expire_leases(ctx)) == 0
    clock[0] += 59_999
    assert run(service.expire_leases(ctx)) == 0
    clock[0] += 1
    assert run(service.expire_leases(ctx)) == 1
    released = ctx.log.events[-1]
    assert isinstance(released, ev.ReservationReleased) and released.reason == "expired"
    assert released.command_id == "lease-expired:r1" and released.occurred_at == time_of(T0 + 60_000)
    assert ctx.log.state.stock["A"].reserved == 0
    seq = ctx.log.last_seq
    assert run(service.expire_leases(ctx)) == 0 and ctx.log.last_seq == seq
    # The same command again (a crash between append and answer, then a retry) is a duplicate.
    again = run(ctx.log.append(service.lease_release("r1", time_of(T0 + 60_000))))
    assert again.duplicate and ctx.log.last_seq == seq


def test_a_long_reservation_id_gets_a_command_id_within_128_characters():
    rid = "r" * 128
    cid = service.lease_command_id(rid)
    assert len(cid) <= 128 and cid == service.lease_command_id(rid) != service.lease_command_id("r" * 127 + "s")


ops = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 5), st.one_of(st.none(), st.integers(1, 600))),
    st.tuples(st.just("fulfil"), st.integers(0, 5), st.none()),
    st.tuples(st.just("release"), st.integers(0, 5), st.none()),
    st.tuples(st.just("clock"), st.integers(-900, 900), st.none()),   # seconds; jumps either way
    st.tuples(st.just("job"), st.just(0), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, min_size=1, max_size=40))
def test_leases_never_release_a_fulfilled_reservation_and_the_job_is_idempotent(steps):
    clock = [T0]
    ctx = context(clock)
    run(ctx.log.append(ev.AppendCommand("in", [ev.Receive(sku="A", qty=1000, location="floor")])))
    for n, (op, arg, ttl) in enumerate(steps):
        rid = f"r{arg}"
        if op == "clock":
            clock[0] += arg * 1000
            continue
        if op == "job":
            run(service.expire_leases(ctx))
            seq = ctx.log.last_seq
            # A second run at the same time appends nothing, and no lease due is left open.
            assert run(service.expire_leases(ctx)) == 0 and ctx.log.last_seq == seq
            now = time_of(clock[0])
            assert not [r for r in ctx.log.state.reservations.values()
                        if r.status == "open" and r.expires_at is not None and r.expires_at <= now]
            continue
        intent = {"reserve": lambda: ev.Reserve(sku="A", qty=1, reservation_id=rid,
                                               **({} if ttl is None else {"ttl_s": ttl})),
                  "fulfil": lambda: ev.FulfilReservation(reservation_id=rid),
                  "release": lambda: ev.ReleaseReservation(reservation_id=rid)}[op]()
        res = ctx.log.state.reservations.get(rid)
        try:
            run(ctx.log.append(ev.AppendCommand(f"c{n}", [intent])))
        except Refused as refusal:
            if refusal.code == "lease_expired":
                assert res is not None and res.expires_at is not None and ms_of(res.expires_at) <= clock[0]
            continue
        if op != "reserve":   # a till's close went through: the lease had not ended
            assert res.expires_at is None or clock[0] < ms_of(res.expires_at)
    closing: dict[str, list[ev.AnyEvent]] = {}
    reserved = {e.reservation_id: e for e in ctx.log.events if isinstance(e, ev.Reserved)}
    for e in ctx.log.events:
        if isinstance(e, (ev.ReservationReleased, ev.ReservationFulfilled)):
            closing.setdefault(e.reservation_id, []).append(e)
    for rid, closes in closing.items():
        assert len(closes) == 1, f"{rid} closed {len(closes)} times"
        close = closes[0]
        if isinstance(close, ev.ReservationReleased) and close.reason == "expired":
            # Released by expiry only once the lease had ended, never early after a clock jump back.
            assert ms_of(close.recorded_at) >= ms_of(reserved[rid].expires_at)
            assert close.command_id == service.lease_command_id(rid)
