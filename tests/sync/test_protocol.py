"""The wire format: batches round-trip byte for byte; anything else is a ProtocolError."""

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync import protocol
from tests.sync.helpers import STORE, body


@given(first=st.integers(1, 10**9), n=st.integers(1, 50))
def test_batch_round_trips_raw_bodies(first, n):
    bodies = [body(s) for s in range(first, first + n)]
    batch, events = protocol.decode_batch(protocol.encode_batch(STORE, first, first + n - 1, bodies))
    assert (batch.v, batch.store_id, batch.first_seq, batch.last_seq) == (1, STORE, first, first + n - 1)
    assert [bytes(raw) for _, raw in events] == bodies
    assert [head.seq for head, _ in events] == list(range(first, first + n))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    try:
        protocol.decode_batch(data)
    except protocol.ProtocolError:
        pass


def test_payload_is_utf8_json_with_v1():
    payload = protocol.encode_batch(STORE, 1, 1, [body(1)])
    assert json.loads(payload.decode("utf-8"))["v"] == 1
    assert json.loads(protocol.encode(protocol.Ack(store_id=STORE, acked_seq=3, epoch="e1", rev=7))) == {
        "store_id": STORE, "acked_seq": 3, "v": 1, "epoch": "e1", "rev": 7}


def test_an_ack_from_an_older_hub_decodes_without_a_mark():
    ack = protocol.decode(b'{"v":1,"store_id":"store-0042","acked_seq":5}', protocol.Ack)
    assert (ack.acked_seq, ack.epoch, ack.rev) == (5, None, None)


@pytest.mark.parametrize("payload", [
    b'{"v":1,"store_id":"store-0042","acked_seq":5,"epoch":"","rev":1}',
    b'{"v":1,"store_id":"store-0042","acked_seq":5,"epoch":"e","rev":-1}',
    b'{"v":1,"store_id":"store-0042","acked_seq":5,"epoch":7,"rev":1}',
])
def test_a_malformed_ack_mark_is_refused(payload):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(payload, protocol.Ack)


@pytest.mark.parametrize("topic, expected", [
    ("retail/stores/store-0042/events", "store-0042"),
    ("retail/stores/a/b/events", None),
    ("other/stores/store-0042/events", None),
    ("retail/stores/store-0042/ack", None),
])
def test_store_of_topic(topic, expected):
    assert protocol.store_of("retail", topic, "events") == expected


class _WithSku(protocol.EventHead, frozen=True, kw_only=True, tag_field="type"):
    sku: str


class _ReceivedView(_WithSku, tag="received"):
    qty: int


def test_a_view_reads_more_fields_in_the_same_decode():
    _, events = protocol.decode_batch(protocol.encode_batch(STORE, 1, 2, [body(1), body(2)]), _ReceivedView)
    assert [(type(head), head.seq, head.sku, head.qty) for head, _ in events] == [
        (_ReceivedView, 1, "A1", 1), (_ReceivedView, 2, "A1", 1)]


def test_an_event_the_view_does_not_fit_makes_every_head_a_plain_event_head():
    odd = json.loads(body(2))
    odd["type"] = "sold"  # not a type the view knows
    bodies = [body(1), json.dumps(odd, separators=(",", ":")).encode()]
    _, events = protocol.decode_batch(protocol.encode_batch(STORE, 1, 2, bodies), _ReceivedView)
    assert [type(head) for head, _ in events] == [protocol.EventHead, protocol.EventHead]
    assert [bytes(raw) for _, raw in events] == bodies


def test_a_view_never_accepts_what_event_head_refuses():
    bad = json.loads(body(1))
    bad["event_id"] = ""
    payload = protocol.encode_batch(STORE, 1, 1, [json.dumps(bad).encode()])
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_batch(payload, _ReceivedView)


def test_a_view_must_extend_event_head():
    class Other(msgspec.Struct):
        seq: int

    with pytest.raises(TypeError):
        protocol.decode_batch(protocol.encode_batch(STORE, 1, 1, [body(1)]), Other)
