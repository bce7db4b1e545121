"""The uplink's rules as a pure function: `decide(window, message, now, limits) -> (window, actions)`.

No clock, no I/O, no asyncio: `now` is a monotonic time in seconds handed in, wall-clock
times arrive inside messages (`AckArrived.at`), and the shell (sync/uplink.py) carries
out the actions. Everything here is plain frozen data. The rules (docs/protocol.md):

* at most `limits.max_inflight` batches beyond the ack (the window);
* no ack progress for `limits.ack_timeout_s` while events are outstanding and the link
  is up: send again from `acked_seq + 1` (a resend);
* an ack below the cursor (the hub restored an older database) rewinds the cursor and
  sends again from there (a rewind);
* an ack that carries the hub's `epoch` and a per-store `rev` is stale when the epoch is
  the one held and its rev is below the held rev (two hub workers' acks crossed in
  flight): ignored and counted, never a rewind. The highest (epoch, rev) accepted is
  persisted with the cursor. An ack from another epoch (the hub's record was restored)
  or without the fields (an older hub) follows the rules above;
* an ack above the highest seq known to exist (the log's end as last seen, or what was
  sent) is an alarm: logged, counted, shown, never trusted (the cursor stays), until an ack
  the log covers arrives;
* an ack equal to the cursor changes nothing (unless the cursor's write failed: then
  the write is asked for again);
* a published batch that does not continue `sent_seq` (a resend or a rewind happened
  while it was read), or that the window has no room for, is ignored;
* a reconnect restarts the ack timer: the session redelivers what was in flight.

The cursor moves in memory when the ack is decided (so the window slides at once); the
shell persists it (`StoreCursor`), reports the commit back (`CursorStored`), and only then
lets the MQTT adapter acknowledge the ack message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings the rules read (`sync.max_inflight`, `sync.ack_timeout_s`)."""

    max_inflight: int
    ack_timeout_s: float


@dataclass(frozen=True, slots=True)
class Window:
    """What the uplink knows: the cursor, what it sent, the log's end, its counters.

    `stored_seq` is the cursor as last reported durable, `last_ack_at` its time;
    `inflight` holds the last seq of each batch sent beyond the ack, ascending;
    `progress_at` is the monotonic time of the last ack progress, of the first send into
    an empty window, or of the last reconnect with batches in flight.
    `epoch`/`rev`: the hub's mark of the last accepted ack (None: an older hub, or none
    yet); `stored_epoch`/`stored_rev` the mark as last reported durable.
    """

    acked_seq: int = 0
    sent_seq: int = 0
    last_seq: int = 0
    inflight: tuple[int, ...] = ()
    progress_at: float = 0.0
    connected: bool = False
    stored_seq: int = 0
    last_ack_at: str | None = None
    resends: int = 0
    rewinds: int = 0
    ack_alarms: int = 0
    alarm: str | None = None
    events_sent: int = 0
    epoch: str | None = None
    rev: int | None = None
    stored_epoch: str | None = None
    stored_rev: int | None = None
    stale_acks: int = 0


def start(acked_seq: int, last_ack_at: str | None, last_seq: int, now: float,
          epoch: str | None = None, rev: int | None = None) -> Window:
    """The window of a freshly opened uplink: the stored cursor and mark, nothing sent yet."""
    return Window(acked_seq=acked_seq, sent_seq=acked_seq, last_seq=max(last_seq, acked_seq),
                  progress_at=now, stored_seq=acked_seq, last_ack_at=last_ack_at,
                  epoch=epoch, rev=rev, stored_epoch=epoch, stored_rev=rev)


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class LogGrew:
    """The log's end as just read (a smaller value than known is ignored: logs only grow)."""

    last_seq: int


@dataclass(frozen=True, slots=True)
class AckArrived:
    """The hub's ack for this store, decoded; `at` is its arrival time (RFC 3339).

    `epoch`/`rev`: the ack's optional mark (both or neither count; see the module docstring).
    """

    store_id: str
    acked_seq: int
    at: str
    epoch: str | None = None
    rev: int | None = None


@dataclass(frozen=True, slots=True)
class CursorStored:
    """The shell committed `StoreCursor(acked_seq, at, epoch, rev)`."""

    acked_seq: int
    at: str
    epoch: str | None = None
    rev: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionChanged:
    up: bool


@dataclass(frozen=True, slots=True)
class BatchSent:
    """Events first_seq..last_seq were handed to the MQTT client (QoS 1)."""

    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (the shell's wait ended)."""


Message = LogGrew | AckArrived | CursorStored | ConnectionChanged | BatchSent | Tick

# ------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class StoreCursor:
    """Persist the cursor and its mark; only then may the ack message be acknowledged. Then `CursorStored`."""

    acked_seq: int
    at: str
    epoch: str | None = None
    rev: int | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Read and publish up to `batches` consecutive batches after `after_seq`, one `BatchSent` each."""

    after_seq: int
    batches: int


@dataclass(frozen=True, slots=True)
class Alarm:
    """Log at ERROR and persist the status now."""

    text: str


@dataclass(frozen=True, slots=True)
class Note:
    """Log at WARNING (a resend, a rewind)."""

    text: str


Action = StoreCursor | Send | Alarm | Note


def decide(w: Window, message: Message, now: float, limits: Limits) -> tuple[Window, list[Action]]:
    """Return the new window and what to do for one message; never raises.

    After the message, a due resend is applied, and `Send` is returned whenever the link
    is up, the window has room and the log holds events beyond `sent_seq`.
    """
    actions: list[Action] = []
    if isinstance(message, LogGrew):
        w = replace(w, last_seq=max(w.last_seq, message.last_seq))
    elif isinstance(message, AckArrived):
        w, actions = _ack(w, message, now)
    elif isinstance(message, CursorStored):
        w = replace(w, stored_seq=message.acked_seq, last_ack_at=message.at,
                    stored_epoch=message.epoch, stored_rev=message.rev)
    elif isinstance(message, ConnectionChanged):
        w = _connection(w, message.up, now)
    elif isinstance(message, BatchSent):
        w = _sent(w, message, now, limits)
    w, resend = _timeout(w, now, limits)
    return w, actions + resend + _send(w, limits)


def is_stale(w: Window, ack: AckArrived) -> bool:
    """True when `ack` is older than the held mark: same epoch, lower rev (acks crossed in flight)."""
    return (ack.epoch is not None and ack.rev is not None and w.rev is not None
            and ack.epoch == w.epoch and ack.rev < w.rev)


def _ack(w: Window, ack: AckArrived, now: float) -> tuple[Window, list[Action]]:
    seq, known = ack.acked_seq, max(w.last_seq, w.sent_seq)
    if is_stale(w, ack):
        return replace(w, stale_acks=w.stale_acks + 1), []
    if seq > known:
        text = f"sync: ack for {ack.store_id} says {seq} but the log ends at {known}; not trusted"
        return replace(w, ack_alarms=w.ack_alarms + 1, alarm=text), [Alarm(text)]
    # Half a mark is no mark: an ack without both fields follows the rules of an older hub.
    epoch, rev = (ack.epoch, ack.rev) if ack.epoch is not None and ack.rev is not None else (None, None)
    # A trusted ack ends an earlier "ack above the log" alarm (the log has since caught up,
    # e.g. rehydrated from the hub).
    w = replace(w, epoch=epoch, rev=rev, alarm=None)
    changed = seq != w.stored_seq or (epoch, rev) != (w.stored_epoch, w.stored_rev)
    store: list[Action] = [StoreCursor(seq, ack.at, epoch, rev)] if changed else []
    if seq == w.acked_seq:
        return w, store
    if seq < w.acked_seq:
        note = Note(f"sync: the hub acks {seq}, below our cursor {w.acked_seq} (hub restored?);"
                    f" sending again from {seq + 1}")
        return replace(w, acked_seq=seq, sent_seq=seq, inflight=(), progress_at=now,
                       rewinds=w.rewinds + 1), [note, *store]
    return replace(w, acked_seq=seq, sent_seq=max(w.sent_seq, seq), progress_at=now,
                   inflight=tuple(s for s in w.inflight if s > seq)), store


def _connection(w: Window, up: bool, now: float) -> Window:
    if up == w.connected:
        return w
    # Back up: the session redelivers the batches in flight; give the hub a full timeout.
    return replace(w, connected=up, progress_at=now if up and w.inflight else w.progress_at)


def _sent(w: Window, batch: BatchSent, now: float, limits: Limits) -> Window:
    if (batch.first_seq != w.sent_seq + 1 or batch.last_seq < batch.first_seq
            or len(w.inflight) >= limits.max_inflight):
        return w
    return replace(w, sent_seq=batch.last_seq, last_seq=max(w.last_seq, batch.last_seq),
                   inflight=w.inflight + (batch.last_seq,),
                   progress_at=w.progress_at if w.inflight else now,
                   events_sent=w.events_sent + batch.last_seq - batch.first_seq + 1)


def _timeout(w: Window, now: float, limits: Limits) -> tuple[Window, list[Action]]:
    due = next_deadline(w, limits)
    if due is None or now < due:
        return w, []
    note = Note(f"sync: no ack progress for {limits.ack_timeout_s:g}s (acked {w.acked_seq}, sent"
                f" {w.sent_seq}); sending again from {w.acked_seq + 1}")
    return replace(w, sent_seq=w.acked_seq, inflight=(), progress_at=now, resends=w.resends + 1), [note]


def _send(w: Window, limits: Limits) -> list[Action]:
    free = limits.max_inflight - len(w.inflight)
    if w.connected and w.sent_seq < w.last_seq and free > 0:
        return [Send(w.sent_seq, free)]
    return []


def next_deadline(w: Window, limits: Limits) -> float | None:
    """When a resend is due (monotonic seconds), or None: nothing in flight, or the link is down."""
    return w.progress_at + limits.ack_timeout_s if w.inflight and w.connected else None
