"""The pure core: decide and evolve with a fake clock and ids, no I/O."""

import copy
import itertools

import pytest
from hypothesis import given, settings

from agent import events as ev
from agent.inventory import Inventory, Refused, decide, decide_and_apply, effect, evolve, fold
from tests.unit.strategies import commands

NOW = "2026-11-27T10:00:00.000Z"


def ids():
    counter = itertools.count(1)
    return lambda: f"00000000-0000-7000-8000-{next(counter):012d}"


def run(state, *intents, command_id="c1"):
    events = decide(state, ev.AppendCommand(command_id, list(intents)), NOW, ids())
    for event in events:
        evolve(state, event)
    return events


def test_received_then_sold_updates_locations():
    state = Inventory("s1")
    run(state, ev.Receive(sku="A", qty=10, location="floor"), ev.Sell(sku="A", qty=3))
    assert (state.stock["A"].floor, state.stock["A"].backroom) == (7, 0)
    assert state.last_seq == 2


def test_sale_below_zero_is_recorded_and_flagged():
    state = Inventory("s1")
    [sold] = run(state, ev.Sell(sku="A", qty=2))
    assert isinstance(sold, ev.Sold) and sold.negative_stock is True
    assert state.stock["A"].floor == -2
    assert state.stock["A"].available == 0


def test_count_records_variance_against_replaced_on_hand():
    state = Inventory("s1")
    run(state, ev.Receive(sku="A", qty=10, location="backroom"))
    [counted] = run(state, ev.Count(sku="A", location="backroom", counted=7), command_id="c2")
    assert counted.variance == -3
    assert state.stock["A"].backroom == 7


def test_reserve_beyond_available_is_refused_and_state_unchanged():
    state = Inventory("s1")
    run(state, ev.Receive(sku="A", qty=5))
    before = (state.stock["A"], state.last_seq)
    with pytest.raises(Refused) as info:
        decide(state, ev.AppendCommand("c2", [ev.Reserve(sku="A", qty=6, reservation_id="r1")]), NOW, ids())
    assert info.value.code == "insufficient_stock" and info.value.field == "events[0].qty"
    assert (state.stock["A"], state.last_seq) == before


def test_refused_intent_refuses_whole_command():
    state = Inventory("s1")
    with pytest.raises(Refused):
        decide(state, ev.AppendCommand("c", [ev.Receive(sku="A", qty=5),
                                             ev.Reserve(sku="A", qty=9, reservation_id="r")]), NOW, ids())
    assert state.stock == {} and state.last_seq == 0


def test_later_intents_see_earlier_ones_in_the_same_command():
    state = Inventory("s1")
    events = run(state, ev.Receive(sku="A", qty=5), ev.Reserve(sku="A", qty=5, reservation_id="r"))
    assert [e.seq for e in events] == [1, 2]
    assert state.stock["A"].available == 0


@pytest.mark.parametrize("closing", [ev.ReleaseReservation(reservation_id="r"),
                                     ev.FulfilReservation(reservation_id="r")])
def test_closed_or_unknown_reservation_cannot_be_closed(closing):
    state = Inventory("s1")
    with pytest.raises(Refused) as unknown:
        decide(state, ev.AppendCommand("c0", [closing]), NOW, ids())
    assert unknown.value.code == "unknown_reservation"
    run(state, ev.Receive(sku="A", qty=5), ev.Reserve(sku="A", qty=2, reservation_id="r"))
    run(state, closing, command_id="c2")
    with pytest.raises(Refused) as closed:
        decide(state, ev.AppendCommand("c3", [closing]), NOW, ids())
    assert closed.value.code == "reservation_closed"


def test_fulfilment_takes_stock_and_releases_reservation():
    state = Inventory("s1")
    run(state, ev.Receive(sku="A", qty=5, location="floor"), ev.Reserve(sku="A", qty=2, reservation_id="r"))
    [done] = run(state, ev.FulfilReservation(reservation_id="r"), command_id="c2")
    assert (done.sku, done.qty) == ("A", 2)
    assert (state.stock["A"].floor, state.stock["A"].reserved) == (3, 0)
    assert state.reservations["r"].status == "fulfilled"


def test_reservation_id_is_used_once():
    state = Inventory("s1")
    run(state, ev.Receive(sku="A", qty=5), ev.Reserve(sku="A", qty=1, reservation_id="r"))
    run(state, ev.ReleaseReservation(reservation_id="r"), command_id="c2")
    with pytest.raises(Refused) as info:
        decide(state, ev.AppendCommand("c3", [ev.Reserve(sku="A", qty=1, reservation_id="r")]), NOW, ids())
    assert info.value.code == "reservation_exists"


def test_move_to_same_location_is_invalid():
    with pytest.raises(Refused) as info:
        decide(Inventory("s1"), ev.AppendCommand("c", [ev.Move(sku="A", qty=1, from_="floor", to="floor")]),
               NOW, ids())
    assert info.value.status == 422 and info.value.field == "events[0].to"


def test_occurred_at_defaults_to_now_and_is_kept_when_given():
    state = Inventory("s1")
    a, b = run(state, ev.Receive(sku="A", qty=1),
               ev.Receive(sku="A", qty=1, occurred_at="2026-11-01T08:00:00Z"))
    assert (a.occurred_at, b.occurred_at, b.recorded_at) == (NOW, "2026-11-01T08:00:00Z", NOW)


@settings(max_examples=300, deadline=None)
@given(commands())
def test_reservations_never_exceed_available_and_fold_equals_incremental(cmds):
    state = Inventory("s1")
    appended = []
    new_id = ids()
    for cmd in cmds:
        snapshot = {k: (v.floor, v.backroom, v.reserved) for k, v in state.stock.items()}
        try:
            events = decide(state, cmd, NOW, new_id)
        except Refused:
            assert {k: (v.floor, v.backroom, v.reserved) for k, v in state.stock.items()} == snapshot
            continue
        for event in events:
            if isinstance(event, ev.Reserved):
                assert event.qty <= state.stock_of(event.sku).available
            evolve(state, event)
            appended.append(event)
    assert [e.seq for e in appended] == list(range(1, len(appended) + 1))
    replay = fold("s1", appended)
    assert replay.stock == state.stock
    assert replay.reservations == state.reservations
    for sku, row in state.stock.items():
        deltas = [effect(e) for e in appended if effect(e).sku == sku]
        assert row.floor == sum(d.floor for d in deltas)
        assert row.reserved == sum(d.reserved for d in deltas) >= 0


@settings(max_examples=300, deadline=None)
@given(commands())
def test_decide_and_apply_equals_decide_then_evolve_and_refusal_changes_nothing(cmds):
    applied, reference = Inventory("s1"), Inventory("s1")
    ids_a, ids_b = ids(), ids()
    for cmd in cmds:
        before = copy.deepcopy(applied)
        try:
            expected = decide(reference, cmd, NOW, ids_b)
        except Refused as refusal:
            with pytest.raises(Refused) as info:
                decide_and_apply(applied, cmd, NOW, ids_a)
            assert (info.value.code, info.value.field) == (refusal.code, refusal.field)
            assert applied == before  # no row created, copied or changed
            continue
        decided = decide_and_apply(applied, cmd, NOW, ids_a)
        assert [event for event, _ in decided] == expected
        assert [eff for _, eff in decided] == [effect(event) for event in expected]
        for event in expected:
            evolve(reference, event)
        assert applied == reference
