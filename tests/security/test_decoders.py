"""Every decoder, on any input, raises only its own error: never RecursionError or anything else.

Inputs: arbitrary bytes, arbitrary JSON, valid payloads with a value nested thousands
deep spliced in (closed or not, before or after the fields a decoder looks for), and
huge numbers. Plus the duplicate-key check's fast path against an exact reference.
"""

import json
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import events as ev
from common import jsoncheck
from sync import downlink, protocol
from sync.hub.projection import EVENT_VIEW
from tests.sync.helpers import batch, body

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COMMAND = b'{"command_id":"c1","events":[{"type":"received","sku":"A1","qty":2,"location":"floor"}]}'
SNAPSHOT = (b'{"v":1,"store_id":"store-a","version":3,"generated_at":"2026-11-27T13:05:00.123Z",'
            b'"items":[{"sku":"A1","nearby":[{"store_id":"store-b","available":4}],"online":2}]}')
CATALOG = b'{"v":1,"version":2,"items":[{"sku":"A1","name":"Anvil"}]}'
ACK = b'{"v":1,"store_id":"store-0042","acked_seq":5}'
STATUS = b'{"v":1,"store_id":"store-0042","state":"online","accept":["application/zlib+json"]}'
WAREHOUSE = b'{"v":1,"warehouse_id":"w1","version":1,"items":[{"sku":"A1","available":3}]}'
SAMPLES = [COMMAND, SNAPSHOT, CATALOG, ACK, STATUS, WAREHOUSE, batch(1, 3), body(1)]


def decode_snapshot(payload: bytes):
    head = downlink.decode_head(downlink.plain(payload, None), "store-a")
    return downlink.rows_from(head.items, chunk=1)


def decode_catalog_in_class(payload: bytes):
    return downlink._catalog_decoder.decode(payload)   # what Downlink.on_catalog calls


# (decoder, the errors it may raise)
DECODERS = [
    (ev.decode_command, (msgspec.ValidationError, msgspec.DecodeError)),
    (ev.decode_event, (ev.EventDecodeError,)),
    (protocol.decode_batch, (protocol.ProtocolError,)),
    (lambda p: protocol.decode_batch(p, EVENT_VIEW), (protocol.ProtocolError,)),
    (lambda p: protocol.decode(p, protocol.Ack), (protocol.ProtocolError,)),
    (lambda p: protocol.decode(p, protocol.Status), (protocol.ProtocolError,)),
    (lambda p: protocol.decode(p, protocol.WarehouseStock), (protocol.ProtocolError,)),
    (lambda p: protocol.decode(p, protocol.Catalog), (protocol.ProtocolError,)),
    (decode_snapshot, (downlink.Malformed,)),
    (lambda p: downlink.decode_catalog(p, None), (downlink.Malformed,)),
    (lambda p: downlink.decode_catalog(zlib.compress(p), downlink.ZLIB_JSON), (downlink.Malformed,)),
    (decode_catalog_in_class, (msgspec.DecodeError,)),
]
IDS = ["command", "event", "batch", "batch_view", "ack", "status", "warehouse", "catalog_msg",
       "snapshot", "catalog", "catalog_zlib", "catalog_in_class"]


def only_own_errors(decode, allowed, payload: bytes) -> None:
    try:
        decode(payload)
    except allowed:
        pass
    except Exception as exc:  # the failure this suite exists for
        pytest.fail(f"{type(exc).__name__} escaped: {str(exc)[:200]} (payload {payload[:80]!r}...)")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)


@st.composite
def deep(draw) -> bytes:
    depth = draw(st.sampled_from([50, 900, 1000, 2000, 5000, 40_000]))
    kind = draw(st.sampled_from(["array", "object", "mixed"]))
    if kind == "array":
        opened, closed = b"[" * depth, b"]" * depth
    elif kind == "object":
        opened, closed = b'{"a":' * depth, b"}" * depth
    else:
        opened, closed = b'[{"a":' * (depth // 2), b"}]" * (depth // 2)
    return opened + b"1" + (closed if draw(st.booleans()) else b"")


@st.composite
def spliced(draw) -> bytes:
    """A valid sample with a deep value, or a huge number, spliced in after some `{` or `:`."""
    sample = draw(st.sampled_from(SAMPLES))
    cuts = [i + 1 for i, c in enumerate(sample) if c in b"{,"]
    cut = draw(st.sampled_from(cuts))
    value = draw(deep() | st.sampled_from([b"9" * 5000, b"-" + b"9" * 5000, b"1e999999", b'"' + b"\\u00e9" * 2000 + b'"']))
    return sample[:cut] + b'"x":' + value + b"," + sample[cut:]


@pytest.mark.parametrize("decode, allowed", DECODERS, ids=IDS)
@SETTINGS
@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_decoders_error(decode, allowed, payload):
    only_own_errors(decode, allowed, payload)


@pytest.mark.parametrize("decode, allowed", DECODERS, ids=IDS)
@SETTINGS
@given(value=json_values)
def test_arbitrary_json_raises_only_the_decoders_error(decode, allowed, value):
    only_own_errors(decode, allowed, json.dumps(value).encode())


@pytest.mark.parametrize("decode, allowed", DECODERS, ids=IDS)
@SETTINGS
@given(payload=deep() | spliced())
def test_deep_nesting_and_huge_numbers_raise_only_the_decoders_error(decode, allowed, payload):
    only_own_errors(decode, allowed, payload)


@pytest.mark.parametrize("decode, allowed", DECODERS, ids=IDS)
def test_every_decoder_takes_its_valid_sample(decode, allowed):
    """The properties above would hold for a decoder that refuses everything: this one would not."""
    accepted = 0
    for sample in SAMPLES:
        try:
            decode(sample)
            accepted += 1
        except allowed:
            pass
    assert accepted >= 1


def test_deep_nesting_is_refused_by_name():
    deep_event = body(1)[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    with pytest.raises(protocol.ProtocolError, match="nested too deep"):
        protocol.decode_batch(protocol.encode_batch("store-0042", 1, 1, [deep_event]))
    with pytest.raises(protocol.ProtocolError, match="nested too deep"):
        protocol.decode(STATUS[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}", protocol.Status)
    with pytest.raises(ev.EventDecodeError, match="nested too deep"):
        ev.decode_event(deep_event)
    with pytest.raises(downlink.Malformed, match="nested too deep") as bad:
        downlink.decode_head(SNAPSHOT[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}", "store-a")
    assert bad.value.reason == "decode"


def test_upcaster_that_fails_is_an_event_decode_error(monkeypatch):
    monkeypatch.setitem(ev._CURRENT, "received", 2)

    @ev.upcaster("received", 1)
    def needs_quantity(data):
        data["qty"] = data.pop("quantity")
        data["schema"] = 2
        return data

    try:
        with pytest.raises(ev.EventDecodeError, match="upcaster for received schema 1 failed: KeyError"):
            ev.decode_event(body(1))
    finally:
        ev.unregister_upcaster("received", 1)


# ------------------------------------------------------------------ timestamps

@pytest.mark.parametrize("text", ["2026-13-45T99:99:99Z", "2026-02-30T00:00:00Z", "2026-11-27T13:05:00.123",
                                  "2026-11-27T13:05:00+00:00", "2026-11-27 13:05:00Z", "2026-11-27T25:00:00Z",
                                  "2026-11-27T13:60:00Z", "2026-11-27T13:05:00.Z", "2026-11-27T13:05:00.1234567890Z"])
def test_valid_time_refuses_what_is_no_real_utc_date_time(text):
    assert not ev.valid_time(text)


@SETTINGS
@given(when=st.datetimes(min_value=__import__("datetime").datetime(1, 1, 1)),
       digits=st.integers(0, 9))
def test_valid_time_takes_every_real_date_time_in_the_contracts_format(when, digits):
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if len(text) != 19:   # strftime does not zero-pad years below 1000 on every platform
        text = f"{when.year:04d}" + text[text.index("-"):]
    if digits:
        text += "." + f"{when.microsecond:06d}{when.microsecond % 1000:03d}"[:digits]
    assert ev.valid_time(text + "Z"), text


def test_snapshot_generated_at_must_be_a_real_date_time():
    bad = SNAPSHOT.replace(b"2026-11-27T13:05:00.123Z", b"2026-13-45T99:99:99Z")
    with pytest.raises(downlink.Malformed, match="generated_at") as refused:
        downlink.decode_head(bad, "store-a")
    assert refused.value.reason == "shape"
    assert downlink.decode_head(SNAPSHOT, "store-a").version == 3


# ------------------------------------------------------------------ duplicate keys

def reference_duplicate(text: bytes) -> bool:
    found = []

    def hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            found.append(True)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return bool(found)


keys = st.sampled_from(["a", "b", "c", "a:b", 'q"', "é", ""])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.sampled_from(["x", "a:b", ":", 'q":"', "\\", "é", "\u2028"])


@st.composite
def json_text(draw, depth: int = 3) -> str:
    """JSON text whose objects may repeat keys, with random spacing and escaping."""
    sep = draw(st.sampled_from(["", " ", "\n  "]))
    ascii_only = draw(st.booleans())

    def dump(value) -> str:
        return json.dumps(value, ensure_ascii=ascii_only)

    if depth == 0 or draw(st.booleans()):
        return dump(draw(scalars))
    if draw(st.booleans()):
        items = draw(st.lists(json_text(depth - 1), max_size=3))
        return "[" + ("," + sep).join(items) + "]"
    pairs = draw(st.lists(st.tuples(keys, json_text(depth - 1)), max_size=4))
    return "{" + ("," + sep).join(f"{dump(k)}:{sep}{v}" for k, v in pairs) + "}"


@settings(max_examples=600, deadline=None)
@given(text=json_text())
def test_duplicate_key_check_agrees_with_an_exact_reference(text):
    raw = text.encode()
    assert (jsoncheck.duplicate_key(raw) is not None) == reference_duplicate(raw), raw


@SETTINGS
@given(seq=st.integers(1, 5), key=st.sampled_from(["seq", "event_id", "store_id", "type", "qty", "sku", "location"]),
       spaced=st.booleans())
def test_batch_with_a_duplicated_key_in_any_event_is_refused(seq, key, spaced):
    bodies = [body(s) for s in range(1, 6)]
    event = json.loads(bodies[seq - 1])
    text = json.dumps(event, separators=(", ", ": ") if spaced else (",", ":"))
    value = json.dumps(event[key])
    bodies[seq - 1] = (text[:-1] + f',"{key}":{value}' + "}").encode()
    with pytest.raises(protocol.DuplicateKey, match=f"events\\[{seq - 1}\\].{key}") as refused:
        protocol.decode_batch(protocol.encode_batch("store-0042", 1, 5, bodies))
    assert refused.value.reason == "duplicate_key"


def test_batch_envelope_with_a_duplicated_key_is_refused():
    payload = batch(1, 2).replace(b'"v":1,', b'"v":1,"v":1,', 1)
    with pytest.raises(protocol.DuplicateKey, match="key v appears twice"):
        protocol.decode_batch(payload)


def test_the_agents_own_batches_take_the_canonical_path():
    from agent.events import Received, encode
    events = [encode(Received(seq=s, event_id=f"00000000-0000-7000-8000-{s:012d}", store_id="store-0042",
                              occurred_at="2026-11-27T10:00:00.000Z", recorded_at="2026-11-27T10:00:00.000Z",
                              command_id=f"c{s}", sku="A1", qty=1, ref="naïve:\"quoted\"")) for s in (1, 2)]
    payload = protocol.encode_batch("store-0042", 1, 2, events)
    parsed, heads = protocol.decode_batch(payload)
    assert protocol._canonical(payload, parsed)
    assert [bytes(raw) for _, raw in heads] == events
    assert not protocol._canonical(batch(1, 2), protocol.decode_batch(batch(1, 2))[0])  # other key order


async def test_downlink_drops_a_deep_catalog_instead_of_failing_its_handler(tmp_path):
    from sync.mqtt import Message
    from sync.state import SqliteSyncState

    state = await SqliteSyncState.open(tmp_path / "events.sync.db", "store-a")
    try:
        link = downlink.Downlink(None, "retail", "store-a", state)
        payload = CATALOG[:-1] + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
        await link.on_catalog(Message("retail/catalog", payload, 1, True))
        assert link.drops == {"catalog": 1} and state.catalog_version is None
    finally:
        await state.close()
