"""The store's facts: stored events, the commands that ask for them, and their codecs.

Two families of types live here:

* **Intents** (`Receive`, `Sell`, ...): what a client asks for in `POST /v1/events`.
  They carry the type's fields only; the agent adds the envelope.
* **Events** (`Received`, `Sold`, ...): what the log stores and syncs. One flat JSON
  object each: the envelope (`seq, event_id, store_id, type, occurred_at, recorded_at,
  command_id, schema`) plus the fields of the type.

Every stored event carries `schema`, the version of its type's layout. Old versions stay
readable forever: `decode_event` upcasts them through the registered `upcaster`s before
building the current Struct.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import Annotated, Any, Callable, Literal, Union

import msgspec

from common import jsoncheck
from common.clock import parse_rfc3339

# `(?![\s\S])` is "end of string": msgspec matches with re.search, where `$` also matches
# before a trailing newline ("A1\n" would pass); the lookahead means the same in ECMA
# regex, so the OpenAPI document stays valid.
END = r"(?![\s\S])"
SKU_PATTERN = r"^[A-Za-z0-9._:-]{1,64}" + END
STORE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}" + END
TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z" + END

Sku = Annotated[str, msgspec.Meta(pattern=SKU_PATTERN, description="SKU: 1-64 of A-Z a-z 0-9 . _ : -")]
StoreId = Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
Qty = Annotated[int, msgspec.Meta(ge=1, le=1_000_000, description="integer, 1 to 1,000,000")]
Location = Literal["floor", "backroom"]
Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
CommandId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ReservationId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Timestamp = Annotated[str, msgspec.Meta(pattern=TIME_PATTERN, description="RFC 3339 UTC, e.g. 2026-11-27T13:05:00.123Z")]
CountedQty = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Delta = Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000, description="non-zero integer")]
Reason = Literal["damaged", "shrink", "found", "correction"]
TtlS = Annotated[int, msgspec.Meta(ge=1, le=31_536_000, description="lease length in seconds, 1 to 31,536,000 (a year)")]
ReleaseReason = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                            description="why it was released; `expired` is the lease expiry's")]
EXPIRED = "expired"   # the `reason` of the release the lease-expiry job appends

LOCATIONS: tuple[str, str] = ("floor", "backroom")
EVENT_TYPES: tuple[str, ...] = (
    "received", "sold", "returned", "moved", "counted", "adjusted",
    "reserved", "reservation_released", "reservation_fulfilled",
)

# ---------------------------------------------------------------------------
# Intents: the body of POST /v1/events
# ---------------------------------------------------------------------------


class Intent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    """One requested change. `occurred_at` defaults to the time the agent records it."""

    occurred_at: Timestamp | None = None


class Receive(Intent, tag="received"):
    sku: Sku
    qty: Qty
    location: Location = "backroom"
    ref: Ref | None = None


class Sell(Intent, tag="sold"):
    sku: Sku
    qty: Qty
    location: Location = "floor"
    ref: Ref | None = None


class Return(Intent, tag="returned"):
    sku: Sku
    qty: Qty
    location: Location = "backroom"
    ref: Ref | None = None


class Move(Intent, tag="moved"):
    sku: Sku
    qty: Qty
    from_: Location = msgspec.field(name="from")
    to: Location


class Count(Intent, tag="counted"):
    sku: Sku
    location: Location
    counted: CountedQty


class Adjust(Intent, tag="adjusted"):
    sku: Sku
    location: Location
    delta: Delta
    reason: Reason


class Reserve(Intent, tag="reserved"):
    """A reservation; with `ttl_s` or `expires_at` (not both) it is a lease that expires."""

    sku: Sku
    qty: Qty
    reservation_id: ReservationId
    # UNSET (omitted from the encoding when not given) keeps the body hash of a command
    # stored before leases existed the same, so its retry is still a duplicate.
    ttl_s: TtlS | msgspec.UnsetType = msgspec.UNSET
    expires_at: Timestamp | msgspec.UnsetType = msgspec.UNSET


class ReleaseReservation(Intent, tag="reservation_released"):
    reservation_id: ReservationId
    reason: ReleaseReason | msgspec.UnsetType = msgspec.UNSET


class FulfilReservation(Intent, tag="reservation_fulfilled"):
    reservation_id: ReservationId
    location: Location = "floor"


AnyIntent = Union[Receive, Sell, Return, Move, Count, Adjust, Reserve, ReleaseReservation, FulfilReservation]


class AppendCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of POST /v1/events: 1 to 1000 intents, applied all or none."""

    command_id: CommandId
    events: Annotated[list[AnyIntent], msgspec.Meta(min_length=1, max_length=1000)]


# ---------------------------------------------------------------------------
# Events: what the log stores and syncs
# ---------------------------------------------------------------------------

CURRENT_SCHEMA = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """The envelope every stored event carries."""

    seq: int
    event_id: str
    store_id: str
    occurred_at: str
    recorded_at: str
    command_id: str
    schema: int = CURRENT_SCHEMA


class Received(Event, tag="received", kw_only=True):
    sku: str
    qty: int
    location: Location = "backroom"
    ref: str | None = None


class Sold(Event, tag="sold", kw_only=True):
    """A sale. `negative_stock` is true when it drove on-hand below zero (reported, not refused)."""

    sku: str
    qty: int
    location: Location = "floor"
    ref: str | None = None
    negative_stock: bool = False


class Returned(Event, tag="returned", kw_only=True):
    sku: str
    qty: int
    location: Location = "backroom"
    ref: str | None = None


class Moved(Event, tag="moved", kw_only=True):
    sku: str
    qty: int
    from_: Location = msgspec.field(name="from")
    to: Location


class Counted(Event, tag="counted", kw_only=True):
    """A stock count. `variance` is counted minus the on-hand it replaced."""

    sku: str
    location: Location
    counted: int
    variance: int


class Adjusted(Event, tag="adjusted", kw_only=True):
    sku: str
    location: Location
    delta: int
    reason: Reason


class Reserved(Event, tag="reserved", kw_only=True):
    """`expires_at` (absent: no lease) is when the lease ends; the agent then releases it."""

    sku: str
    qty: int
    reservation_id: str
    expires_at: str | msgspec.UnsetType = msgspec.UNSET


class ReservationReleased(Event, tag="reservation_released", kw_only=True):
    """`sku` and `qty` are recorded from the reservation so the event explains itself.

    `reason` is absent unless the release gave one; `expired` marks the lease expiry's.
    """

    reservation_id: str
    sku: str
    qty: int
    reason: str | msgspec.UnsetType = msgspec.UNSET


class ReservationFulfilled(Event, tag="reservation_fulfilled", kw_only=True):
    """`sku` and `qty` are recorded from the reservation so the event explains itself."""

    reservation_id: str
    sku: str
    qty: int
    location: Location = "floor"


AnyEvent = Union[
    Received, Sold, Returned, Moved, Counted, Adjusted,
    Reserved, ReservationReleased, ReservationFulfilled,
]

# ---------------------------------------------------------------------------
# Codecs and upcasting
# ---------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AnyEvent)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_command_decoder = msgspec.json.Decoder(AppendCommand)

# (type, from_version) -> function turning that version's dict into the next version's.
_UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}
_CURRENT: dict[str, int] = {t: CURRENT_SCHEMA for t in EVENT_TYPES}


class EventDecodeError(ValueError):
    """A stored or received event that cannot be read as any known schema version."""


def upcaster(event_type: str, from_version: int):
    """Register a function that turns `event_type` at `from_version` into `from_version + 1`.

    The function takes and returns a plain dict (the flat JSON object); it must set
    `schema` to `from_version + 1`.
    """

    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]):
        _UPCASTERS[(event_type, from_version)] = fn
        return fn

    return register


def unregister_upcaster(event_type: str, from_version: int) -> None:
    """Remove a registered upcaster (tests use this to clean up a test-only version)."""
    _UPCASTERS.pop((event_type, from_version), None)


def encode(obj: Any) -> bytes:
    """Encode a Struct as compact JSON. For events this is the canonical encoding the hash covers."""
    return _encoder.encode(obj)


def valid_time(text: str) -> bool:
    """True when `text` is an RFC 3339 UTC time as the contract writes it and a real date-time.

    TIME_PATTERN checks the shape; this also refuses what the pattern lets through, such
    as month 13, February 30 or 25:00. A leap second (:60) is refused too: Unix time has
    none and the agent's clock never writes one.
    """
    if not _TIME.match(text):
        return False
    try:
        parse_rfc3339(text)
    except ValueError:
        return False
    return True


_TIME = re.compile(TIME_PATTERN)


def to_ms_precision(text: str) -> str:
    """Return a valid time (see valid_time) in the agent's format, cut to whole milliseconds.

    Cut, not rounded: "13:00:00.0009Z" is before 13:00:00.001, so it becomes .000 and
    compares with the agent's recorded_at strings as the instants do.
    """
    whole, _, frac = text[:-1].partition(".")
    return f"{whole}.{(frac + '000')[:3]}Z"
_occurred_at = attrgetter("occurred_at")


def decode_command(body: bytes) -> AppendCommand:
    """Decode a POST /v1/events body.

    Raises msgspec.DecodeError when the body is not JSON, msgspec.ValidationError (its
    message names the field, see `field_of`) when it does not fit: also for JSON nested
    too deep to decode, an `occurred_at` that is no real date-time and a key given twice
    in one object. Nothing else, on any input.
    """
    try:
        command = _command_decoder.decode(body)
    except RecursionError:
        where = jsoncheck.deep_path(body, _DEEP, keep=3)
        raise msgspec.ValidationError(f"JSON nested too deep to decode - at `$.{where or 'events'}`") from None
    times = list(map(_occurred_at, command.events))
    if times.count(None) != len(times):
        for i, text in enumerate(times):
            if text is not None and not valid_time(text):
                raise msgspec.ValidationError(
                    f"Invalid RFC 3339 date-time {text!r} - at `$.events[{i}].occurred_at`")
    for i, intent in enumerate(command.events):
        if type(intent) is Reserve and intent.expires_at is not msgspec.UNSET:
            if intent.ttl_s is not msgspec.UNSET:
                raise msgspec.ValidationError(f"give ttl_s or expires_at, not both - at `$.events[{i}].expires_at`")
            if not valid_time(intent.expires_at):
                raise msgspec.ValidationError(
                    f"Invalid RFC 3339 date-time {intent.expires_at!r} - at `$.events[{i}].expires_at`")
    # The body fit the types, so it is at most three levels deep and json reads it safely.
    duplicate = jsoncheck.duplicate_key(body)
    if duplicate is not None:
        parent, _, key = duplicate.rpartition(".")
        raise msgspec.ValidationError(f"Object contains duplicate field `{key}` - at `${'.' if parent else ''}{parent}`")
    return command


_DEEP = 64  # where `deep_path` looks for the field holding too deep a value; real bodies nest 3


def decode_event(body: bytes) -> AnyEvent:
    """Decode one stored or synced event, upcasting older schema versions.

    Raises EventDecodeError when the bytes are not an event of any known version, on any
    input (JSON nested too deep to decode, a body that is not an object, an upcaster that
    fails on what it was given).
    """
    try:
        event = _event_decoder.decode(body)
    except msgspec.ValidationError:
        event = None
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"event is not JSON: {exc}") from exc
    except RecursionError:
        raise EventDecodeError("event: JSON nested too deep to decode") from None
    if event is not None and event.schema == _CURRENT.get(type_of(event), CURRENT_SCHEMA):
        return event
    try:
        data = _dict_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"event is not a JSON object: {exc}") from None
    except RecursionError:
        raise EventDecodeError("event: JSON nested too deep to decode") from None
    return _upcast(data)


def _upcast(data: dict[str, Any]) -> AnyEvent:
    etype = data.get("type")
    version = data.get("schema", 1)
    if etype not in _CURRENT or not isinstance(version, int):
        raise EventDecodeError(f"unknown event type {etype!r} or schema {version!r}")
    while version < _CURRENT[etype]:
        step = _UPCASTERS.get((etype, version))
        if step is None:
            raise EventDecodeError(f"no upcaster for {etype} schema {version}")
        try:
            data = step(dict(data))
        except Exception as exc:  # an old event the upcaster cannot read is not an event of that version
            raise EventDecodeError(f"upcaster for {etype} schema {version} failed: {type(exc).__name__}: {exc}") from exc
        version = data.get("schema") if isinstance(data, dict) else None
        if not isinstance(version, int):
            raise EventDecodeError(f"upcaster for {etype} did not set an integer schema")
    if version != _CURRENT[etype]:
        raise EventDecodeError(f"{etype} schema {version} is newer than this agent knows ({_CURRENT[etype]})")
    try:
        return msgspec.convert(data, AnyEvent)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"{etype} schema {version}: {exc}") from exc
    except RecursionError:
        raise EventDecodeError(f"{etype} schema {version}: nested too deep") from None


def type_of(event: Event) -> str:
    """Return the event's `type` tag."""
    return event.__struct_config__.tag  # type: ignore[return-value]


_FIELD_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"(?:missing required|duplicate) field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def field_of(error: msgspec.ValidationError | str) -> str | None:
    """Name the field a msgspec validation error is about, e.g. `events[0].qty`.

    Returns None when the error is about the whole body.
    """
    text = str(error)
    path = _FIELD_PATH.search(text)
    base = path.group(1) if path else ""
    extra = _MISSING.search(text) or _UNKNOWN.search(text)
    if extra:
        base = f"{base}.{extra.group(1)}" if base else extra.group(1)
    return base or None
