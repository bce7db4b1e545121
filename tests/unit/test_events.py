"""Event codecs: strict request decoding, canonical encoding, schema upcasting."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import events as ev

ENVELOPE = dict(seq=1, event_id="e1", store_id="s1", occurred_at="2026-11-27T10:00:00.000Z",
                recorded_at="2026-11-27T10:00:00.000Z", command_id="c1")


def body(*intents, command_id="c1"):
    return msgspec.json.encode({"command_id": command_id, "events": list(intents)})


@pytest.mark.parametrize("bad, field", [
    ({"type": "received", "sku": "A", "qty": "5"}, "events[0].qty"),
    ({"type": "received", "sku": "A", "qty": 5.0}, "events[0].qty"),
    ({"type": "received", "sku": "A", "qty": True}, "events[0].qty"),
    ({"type": "received", "sku": "A", "qty": 0}, "events[0].qty"),
    ({"type": "received", "sku": "A", "qty": 1_000_001}, "events[0].qty"),
    ({"type": "received", "sku": "A b", "qty": 1}, "events[0].sku"),
    ({"type": "received", "sku": "A1\n", "qty": 1}, "events[0].sku"),
    ({"type": "received", "sku": "A" * 65, "qty": 1}, "events[0].sku"),
    ({"type": "received", "sku": "A", "qty": 1, "location": "roof"}, "events[0].location"),
    ({"type": "received", "sku": "A", "qty": 1, "colour": "red"}, "events[0].colour"),
    ({"type": "teleported", "sku": "A"}, "events[0].type"),
    ({"type": "received", "qty": 1}, "events[0].sku"),
    ({"type": "counted", "sku": "A", "location": "floor", "counted": -1}, "events[0].counted"),
    ({"type": "adjusted", "sku": "A", "location": "floor", "delta": 1, "reason": "whim"}, "events[0].reason"),
    ({"type": "received", "sku": "A", "qty": 1, "occurred_at": "yesterday"}, "events[0].occurred_at"),
    ({"type": "received", "sku": "A", "qty": 1, "occurred_at": "2026-11-27T13:05:00Z\n"}, "events[0].occurred_at"),
])
def test_invalid_intents_name_the_field(bad, field):
    with pytest.raises(msgspec.ValidationError) as info:
        ev.decode_command(body(bad))
    assert ev.field_of(info.value) == field


def test_empty_and_oversized_event_lists_are_refused():
    with pytest.raises(msgspec.ValidationError) as empty:
        ev.decode_command(body())
    assert ev.field_of(empty.value) == "events"
    many = [{"type": "received", "sku": "A", "qty": 1}] * 1001
    with pytest.raises(msgspec.ValidationError):
        ev.decode_command(body(*many))


def test_missing_command_id_names_it():
    with pytest.raises(msgspec.ValidationError) as info:
        ev.decode_command(b'{"events": [{"type": "received", "sku": "A", "qty": 1}]}')
    assert ev.field_of(info.value) == "command_id"


def test_stored_event_is_flat_with_envelope_first():
    event = ev.Moved(**ENVELOPE, sku="A", qty=2, from_="backroom", to="floor")
    data = msgspec.json.decode(ev.encode(event))
    assert list(data)[:8] == ["type", "seq", "event_id", "store_id", "occurred_at", "recorded_at",
                              "command_id", "schema"]
    assert data["from"] == "backroom" and data["schema"] == 1
    assert ev.decode_event(ev.encode(event)) == event


def test_unknown_type_or_future_schema_is_a_decode_error():
    with pytest.raises(ev.EventDecodeError):
        ev.decode_event(b'{"type":"teleported","schema":1}')
    future = dict(msgspec.json.decode(ev.encode(ev.Received(**ENVELOPE, sku="A", qty=1))), schema=9)
    with pytest.raises(ev.EventDecodeError):
        ev.decode_event(msgspec.json.encode(future))
    with pytest.raises(ev.EventDecodeError):
        ev.decode_event(b"not json")


def test_old_schema_is_upcast_on_read(received_v2_with_v1_upcaster):
    old = msgspec.json.encode({"type": "received", **ENVELOPE, "schema": 1, "sku": "A", "quantity": 4,
                               "location": "floor", "ref": None})
    event = ev.decode_event(old)
    assert isinstance(event, ev.Received)
    assert (event.qty, event.location, event.schema) == (4, "floor", 2)


def test_missing_upcaster_is_reported(received_v2_with_v1_upcaster):
    ev.unregister_upcaster("received", 1)
    old = msgspec.json.encode({"type": "received", **ENVELOPE, "schema": 1, "sku": "A", "quantity": 4})
    with pytest.raises(ev.EventDecodeError, match="no upcaster for received schema 1"):
        ev.decode_event(old)


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_command_decoder_raises_only_its_own_errors(raw):
    try:
        ev.decode_command(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["type", "seq", "sku", "qty", "schema", "location", "event_id"]),
                       st.one_of(st.integers(-3, 3), st.text(max_size=5), st.none(), st.booleans())))
def test_event_decoder_raises_only_event_decode_error(data):
    try:
        ev.decode_event(msgspec.json.encode(data))
    except ev.EventDecodeError:
        pass
