"""The wire format: batches round-trip byte for byte; anything else is a ProtocolError."""

import json

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
    assert json.loads(protocol.encode(protocol.Ack(store_id=STORE, acked_seq=3))) == {
        "store_id": STORE, "acked_seq": 3, "v": 1}


@pytest.mark.parametrize("topic, expected", [
    ("retail/stores/store-0042/events", "store-0042"),
    ("retail/stores/a/b/events", None),
    ("other/stores/store-0042/events", None),
    ("retail/stores/store-0042/ack", None),
])
def test_store_of_topic(topic, expected):
    assert protocol.store_of("retail", topic, "events") == expected
