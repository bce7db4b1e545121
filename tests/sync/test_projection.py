"""The hub projection's narrow read of an event gives the same stock delta as the full decoder."""

from __future__ import annotations

import sqlite3

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import events as ev
from agent.inventory import effect
from sync import protocol
from sync.hub import projection
from sync.hub.store import SCHEMA_SQL

ENVELOPE = {"seq": 7, "event_id": "00000000-0000-7000-8000-000000000007", "store_id": "store-0042",
            "occurred_at": "2026-11-27T10:00:00.000Z", "recorded_at": "2026-11-27T10:00:00.000Z",
            "command_id": "c-7"}
loc = st.sampled_from(["floor", "backroom"])
qty = st.integers(1, 1_000_000)
sku = st.sampled_from(["A-1", "B.2", "C:3"])
rid = st.sampled_from(["r1", "r2"])

event = st.one_of(
    st.builds(ev.Received, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, qty=qty, location=loc),
    st.builds(ev.Sold, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, qty=qty, location=loc,
              negative_stock=st.booleans()),
    st.builds(ev.Returned, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, qty=qty, location=loc),
    st.builds(ev.Moved, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, qty=qty, from_=loc, to=loc),
    st.builds(ev.Counted, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, location=loc,
              counted=st.integers(0, 50), variance=st.integers(-50, 50)),
    st.builds(ev.Adjusted, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, location=loc,
              delta=st.integers(-9, 9).filter(bool), reason=st.sampled_from(["damaged", "found"])),
    st.builds(ev.Reserved, **{k: st.just(v) for k, v in ENVELOPE.items()}, sku=sku, qty=qty, reservation_id=rid),
    st.builds(ev.ReservationReleased, **{k: st.just(v) for k, v in ENVELOPE.items()}, reservation_id=rid,
              sku=sku, qty=qty),
    st.builds(ev.ReservationFulfilled, **{k: st.just(v) for k, v in ENVELOPE.items()}, reservation_id=rid,
              sku=sku, qty=qty, location=loc),
)


def full(body: bytes) -> tuple:
    eff = effect(ev.decode_event(body))
    return eff.sku, eff.floor, eff.backroom, eff.reserved


@settings(max_examples=400)
@given(event, st.booleans())
def test_narrow_delta_equals_the_full_decoders_effect(event, drop_defaults):
    data = msgspec.json.decode(ev.encode(event))
    if drop_defaults:  # fields with a default may be left out: each side must apply the same default
        for key in ("schema", "ref", "negative_stock"):
            data.pop(key, None)
        if data["type"] in ("received", "sold", "returned", "reservation_fulfilled"):
            data.pop("location")
    body = msgspec.json.encode(data)
    assert projection.stock_delta(body) == full(body)


def test_the_narrow_view_mirrors_the_current_schema_of_every_type():
    # Raising a type's schema means its layout changed: update the narrow Structs in
    # sync/hub/projection.py (and NARROW_SCHEMA) along with it.
    assert set(ev._CURRENT.values()) == {projection.NARROW_SCHEMA}
    assert set(ev.EVENT_TYPES) == set(projection._fact_decoder.type.__args__[i].__struct_config__.tag
                                       for i in range(len(ev.EVENT_TYPES)))


@pytest.mark.parametrize("data", [
    {"type": "teleported", "sku": "A", "qty": 1},                       # unknown type
    {"type": "received", "schema": 9, "sku": "A", "qty": 1},            # a newer schema
    {"type": "received", "sku": "A", "qty": "5"},                       # a field that does not fit
    {"type": "moved", "sku": "A", "qty": 1, "from": "floor", "to": "roof"},
])
def test_what_the_full_decoder_refuses_the_projection_refuses_too(data):
    body = msgspec.json.encode({**ENVELOPE, **data})
    with pytest.raises(ev.EventDecodeError):
        ev.decode_event(body)
    with pytest.raises(ev.EventDecodeError):
        projection.stock_delta(body)


def test_an_older_schema_goes_through_the_upcaster(received_v2_with_v1_upcaster):
    body = msgspec.json.encode({**ENVELOPE, "type": "received", "schema": 1, "sku": "A", "quantity": 4})
    assert projection.stock_delta(body) == ("A", 0, 4, 0)


def test_one_unreadable_event_does_not_keep_the_rest_of_a_group_out():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA_SQL)
    projection.setup(conn)
    good = [msgspec.json.encode({**ENVELOPE, "seq": seq, "type": "received", "sku": "A", "qty": seq})
            for seq in (1, 2, 4)]
    future = msgspec.json.encode({**ENVELOPE, "seq": 3, "type": "received", "schema": 9, "sku": "A", "qty": 100})
    moved = msgspec.json.encode({**ENVELOPE, "seq": 5, "type": "moved", "sku": "A", "qty": 2,
                                 "from": "backroom", "to": "floor"})
    projection.apply_bodies(conn, "store-0042", [good[0], good[1], future, good[2], moved])
    assert conn.execute("SELECT sku, floor, backroom, reserved FROM hub_stock").fetchall() == [("A", 2, 5, 0)]


@settings(max_examples=100)
@given(st.lists(event, min_size=1, max_size=8))
def test_heads_decoded_as_the_event_view_fold_like_the_bodies(events):
    bodies = [ev.encode(msgspec.structs.replace(e, seq=i + 1)) for i, e in enumerate(events)]
    _, pairs = protocol.decode_batch(protocol.encode_batch("store-0042", 1, len(bodies), bodies),
                                     projection.EVENT_VIEW)
    assert all(isinstance(head, projection._Fact) for head, _ in pairs)
    by_heads, by_bodies = (sqlite3.connect(":memory:", isolation_level=None) for _ in range(2))
    for conn in (by_heads, by_bodies):
        conn.executescript(SCHEMA_SQL)
        projection.setup(conn)
    projection.apply_events(by_heads, "store-0042", pairs)
    projection.apply_bodies(by_bodies, "store-0042", bodies)
    expected: dict = {}
    for body in bodies:
        sku, *delta = full(body)
        expected[sku] = tuple(a + b for a, b in zip(expected.get(sku, (0, 0, 0)), delta))
    assert projection.stock(by_heads) == projection.stock(by_bodies) == {"store-0042": expected}


def test_pending_changes_count_at_once_and_are_folded_into_hub_stock_exactly_once():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA_SQL)
    projection.setup(conn)

    def received(seq: int, store_id: str, sku: str) -> tuple:
        body = msgspec.json.encode({**ENVELOPE, "seq": seq, "store_id": store_id, "type": "received",
                                    "sku": sku, "qty": 1})
        return projection._fact_decoder.decode(body), body

    groups = projection.PENDING_ROWS + 3
    for seq in range(1, groups + 1):  # one ingest transaction each, two stores in each
        projection.apply_events(conn, "store-a", [received(seq, "store-a", "A"), received(seq, "store-a", "B")])
        projection.apply_events(conn, "store-b", [received(seq, "store-b", "A")])
        want = {"store-a": {"A": (0, seq, 0), "B": (0, seq, 0)}, "store-b": {"A": (0, seq, 0)}}
        assert projection.stock(conn) == want
        pending = conn.execute("SELECT COUNT(*) FROM hub_stock_pending").fetchone()[0]
        assert pending < projection.PENDING_ROWS
    assert conn.execute("SELECT COUNT(*) FROM hub_stock").fetchone()[0] == 3, "folded at least once"
    projection.fold_pending(conn)
    assert conn.execute("SELECT COUNT(*) FROM hub_stock_pending").fetchone()[0] == 0
    assert conn.execute("SELECT store_id, sku, floor, backroom, reserved FROM hub_stock ORDER BY 1, 2").fetchall() == [
        ("store-a", "A", 0, groups, 0), ("store-a", "B", 0, groups, 0), ("store-b", "A", 0, groups, 0)]
    assert projection.available_by_store(conn) == {"store-a": {"A": groups, "B": groups}, "store-b": {"A": groups}}
