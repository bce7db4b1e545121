"""Sales caps in the pure core: no sequence of commands sells or reserves past an allowance.

A fake clock only: time is an argument of decide; no I/O. The oracle counts usage from the
events alone, by the rule both hub and agent keep (docs/availability.md): within the
period, sum(sold) + sum(reserved) - sum(reservations made in the period and released).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent.inventory import (SLOT_MS, Cap, Inventory, Refused, cap_window, decide_and_apply, fold, ms_of,
                             time_of)

T0 = ms_of("2026-11-29T23:00:00.000Z")   # a Monday 00:00 in Europe/Paris
DAY = 86_400_000
SKUS = ["A-1", "B.2", "C:3"]
RIDS = [f"r{i}" for i in range(8)]


def ids():
    counter = itertools.count(1)
    return lambda: f"00000000-0000-7000-8000-{next(counter):012d}"


def week_cap(allowance: int, limit: int | None = None) -> Cap:
    return Cap(limit if limit is not None else allowance, "store", "week", time_of(T0), time_of(T0 + 7 * DAY),
               allowance)


def oracle_used(events: list[ev.AnyEvent], sku: str, start_ms: int, end_ms: int) -> int:
    """Usage by the documented rule, from the events alone."""
    reserved_at = {e.reservation_id: ms_of(e.recorded_at) for e in events if isinstance(e, ev.Reserved)}
    used = 0
    for e in events:
        if getattr(e, "sku", None) != sku:
            continue
        if isinstance(e, (ev.Sold, ev.Reserved)) and start_ms <= ms_of(e.recorded_at) < end_ms:
            used += e.qty
        elif isinstance(e, ev.ReservationReleased) and start_ms <= reserved_at[e.reservation_id] < end_ms:
            used -= e.qty
    return used


qty = st.integers(1, 3)
intent = st.one_of(
    st.builds(ev.Receive, sku=st.sampled_from(SKUS), qty=st.integers(1, 10), location=st.just("floor")),
    st.builds(ev.Sell, sku=st.sampled_from(SKUS), qty=qty),
    st.builds(ev.Reserve, sku=st.sampled_from(SKUS), qty=qty, reservation_id=st.sampled_from(RIDS)),
    st.builds(ev.ReleaseReservation, reservation_id=st.sampled_from(RIDS)),
    st.builds(ev.FulfilReservation, reservation_id=st.sampled_from(RIDS)),
)
# Between commands: time moves on (by up to two days, so periods end and roll) and caps change.
step = st.tuples(
    st.lists(intent, min_size=1, max_size=4),
    st.integers(0, 2 * DAY),
    st.dictionaries(st.sampled_from(SKUS), st.one_of(st.none(), st.integers(0, 6)), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=30))
def test_no_sequence_of_commands_sells_or_reserves_past_an_allowance(steps):
    state = Inventory("s1")
    events: list[ev.AnyEvent] = []
    new_id = ids()
    now_ms = T0 + 3_600_000
    for n, (intents, advance, cap_changes) in enumerate(steps):
        now_ms += advance
        for sku, allowance in cap_changes.items():
            if allowance is None:
                state.caps.pop(sku, None)
            else:
                state.caps[sku] = week_cap(allowance)
        now = time_of(now_ms)
        command = ev.AppendCommand(f"c{n}", intents)
        counted = {i.sku for i in intents if isinstance(i, (ev.Sell, ev.Reserve))}
        before = {sku: oracle_used(events, sku, *_bounds(state.caps[sku], now)) for sku in counted & set(state.caps)}
        try:
            decided = decide_and_apply(state, command, now, new_id)
        except Refused as refusal:
            if refusal.code == "sales_cap_reached":
                sku = refusal.extra["sku"]
                asked = sum(i.qty for i in intents if isinstance(i, (ev.Sell, ev.Reserve)) and i.sku == sku)
                # Refused only when the command's own sales and reservations would pass it.
                assert before[sku] + asked > state.caps[sku].allowance
                assert refusal.extra["left"] == max(0, state.caps[sku].allowance - before[sku])
            continue
        events.extend(event for event, _ in decided)
        for sku in counted & set(state.caps):
            assert oracle_used(events, sku, *_bounds(state.caps[sku], now)) <= state.caps[sku].allowance
    # The usage the core counted (what the log stores per slot) is the oracle's, in any period.
    replayed = fold("s1", events)
    for sku in SKUS:
        for start in range(T0 - 7 * DAY, now_ms + 7 * DAY, 7 * DAY):
            window = cap_window(week_cap(1), time_of(start))
            counted = sum(q for slot, q in replayed.usage.get(sku, {}).items()
                          if window.first_slot <= slot < window.end_slot)
            assert counted == oracle_used(events, sku, ms_of(window.start), ms_of(window.end))


def _bounds(cap: Cap, now: str) -> tuple[int, int]:
    window = cap_window(cap, now)
    return ms_of(window.start), ms_of(window.end)


def decide_one(state: Inventory, now_ms: int, *intents) -> list[ev.AnyEvent]:
    return [e for e, _ in decide_and_apply(state, ev.AppendCommand("c", list(intents)), time_of(now_ms), ids())]


def test_several_intents_of_one_sku_are_summed_and_refused_all_or_none():
    state = Inventory("s1", caps={"A-1": week_cap(2)})
    decide_one(state, T0 + 1000, ev.Receive(sku="A-1", qty=5, location="floor"))
    before = (state.last_seq, dict(state.usage))
    try:
        decide_one(state, T0 + 2000, ev.Sell(sku="A-1", qty=1), ev.Sell(sku="B.2", qty=9), ev.Sell(sku="A-1", qty=2))
    except Refused as refusal:
        assert refusal.code == "sales_cap_reached" and refusal.field == "events[2].qty"
        assert refusal.extra["left"] == 2 and refusal.extra["limit"] == 2 and refusal.extra["period"] == "week"
    else:
        raise AssertionError("3 units on an allowance of 2 were accepted")
    assert (state.last_seq, dict(state.usage)) == before


def test_a_reservation_made_before_the_period_and_released_in_it_gives_nothing_back():
    state = Inventory("s1", caps={"A-1": week_cap(1)})
    decide_one(state, T0 + 1000, ev.Receive(sku="A-1", qty=5, location="floor"))
    # Reserved in the previous week, released in this one: this week's usage is unchanged.
    decide_one(state, T0 - DAY, ev.Reserve(sku="A-1", qty=1, reservation_id="old"))
    decide_one(state, T0 + 2000, ev.Sell(sku="A-1", qty=1))
    decide_one(state, T0 + 3000, ev.ReleaseReservation(reservation_id="old"))
    try:
        decide_one(state, T0 + 4000, ev.Sell(sku="A-1", qty=1))
    except Refused as refusal:
        assert refusal.code == "sales_cap_reached" and refusal.extra["left"] == 0
    else:
        raise AssertionError("a release of last week's reservation gave this week's allowance back")


def test_past_period_end_usage_counts_from_the_rolled_period_start():
    state = Inventory("s1", caps={"A-1": week_cap(1)})
    decide_one(state, T0 + 1000, ev.Sell(sku="A-1", qty=1))
    # Ten days on, offline: the cap's period rolled by one whole week; last week's sale does not count.
    later = T0 + 10 * DAY
    window = cap_window(state.caps["A-1"], time_of(later))
    assert (window.start, window.end) == (time_of(T0 + 7 * DAY), time_of(T0 + 14 * DAY))
    assert window.first_slot == (T0 + 7 * DAY) // SLOT_MS
    decide_one(state, later, ev.Sell(sku="A-1", qty=1))
    try:
        decide_one(state, later + 1000, ev.Sell(sku="A-1", qty=1))
    except Refused as refusal:
        assert refusal.extra["period_start"] == time_of(T0 + 7 * DAY)
    else:
        raise AssertionError("a second sale in the rolled week was accepted")


def test_an_allowance_of_zero_refuses_the_first_sale():
    state = Inventory("s1", caps={"A-1": week_cap(0, limit=4)})
    try:
        decide_one(state, T0 + 1000, ev.Sell(sku="A-1", qty=1))
    except Refused as refusal:
        assert refusal.message == f"A-1: limit 4 per week, 0 left (week from {time_of(T0)})"
    else:
        raise AssertionError("a sale on an allowance of 0 was accepted")
