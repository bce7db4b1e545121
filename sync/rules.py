"""The uplink's rules as a pure function: `decide(window, message, now, limits) -> (window, actions)`.

No clock, no I/O: `now` is a monotonic time in seconds passed in, and the shell
(sync/uplink.py) carries out the actions. The rules (docs/protocol.md):

* at most `limits.max_inflight` batches beyond the ack;
* no ack progress for `limits.ack_timeout_s` while events are outstanding: send again
  from `acked_seq + 1` (a resend);
* an ack below the cursor (the hub restored an older database) rewinds the cursor and
  sends again from there (a rewind);
* an ack above the highest seq known to exist is an alarm, never trusted;
* a published batch that does not continue `sent_seq` (a rewind happened while it was
  read) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Limits:
    max_inflight: int
    ack_timeout_s: float


@dataclass(frozen=True)
class Window:
    """What the uplink knows: the cursor, what it sent, the log's end, its counters."""

    acked_seq: int = 0
    sent_seq: int = 0
    last_seq: int = 0
    inflight: tuple[int, ...] = ()      # last seq of each batch beyond the ack
    progress_at: float = 0.0
    connected: bool = False
    resends: int = 0
    rewinds: int = 0
    ack_alarms: int = 0
    alarm: str | None = None


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class LogGrew:
    last_seq: int


@dataclass(frozen=True)
class AckArrived:
    store_id: str
    acked_seq: int


@dataclass(frozen=True)
class ConnectionChanged:
    up: bool


@dataclass(frozen=True)
class BatchSent:
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class Tick:
    """Time passed (the shell's wait ended)."""


Message = LogGrew | AckArrived | ConnectionChanged | BatchSent | Tick

# ------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StoreCursor:
    """Persist the cursor; only then may the ack message be acknowledged."""

    acked_seq: int


@dataclass(frozen=True)
class Send:
    """Read and publish up to `batches` consecutive batches after `after_seq`."""

    after_seq: int
    batches: int


@dataclass(frozen=True)
class Alarm:
    text: str


@dataclass(frozen=True)
class Note:
    """A line for the log (a resend or a rewind), at WARNING."""

    text: str


Action = StoreCursor | Send | Alarm | Note


def decide(w: Window, message: Message, now: float, limits: Limits) -> tuple[Window, list[Action]]:
    """Return the new window and what to do, for one message; never raises."""
    actions: list[Action] = []
    if isinstance(message, LogGrew):
        w = replace(w, last_seq=max(w.last_seq, message.last_seq))
    elif isinstance(message, ConnectionChanged):
        w = replace(w, connected=message.up)
    elif isinstance(message, BatchSent):
        if message.first_seq == w.sent_seq + 1 and message.last_seq >= message.first_seq:
            w = replace(w, sent_seq=message.last_seq, inflight=w.inflight + (message.last_seq,),
                        progress_at=now if not w.inflight else w.progress_at)
        return w, []   # the shell sends the rest of its window itself
    elif isinstance(message, AckArrived):
        w, actions = _ack(w, message, now)
    w, more = _timeout(w, now, limits)
    actions += more
    return w, actions + _send(w, limits)


def _ack(w: Window, ack: AckArrived, now: float) -> tuple[Window, list[Action]]:
    seq, known = ack.acked_seq, max(w.last_seq, w.sent_seq)
    if seq > known:
        text = (f"sync: ack for {ack.store_id} says {seq} but the log ends at {known}; not trusted")
        return replace(w, ack_alarms=w.ack_alarms + 1, alarm=text), [Alarm(text)]
    if seq == w.acked_seq:
        return w, []
    if seq < w.acked_seq:
        note = Note(f"sync: the hub acks {seq}, below our cursor {w.acked_seq} (hub restored?); rewinding")
        return replace(w, acked_seq=seq, sent_seq=seq, inflight=(), progress_at=now,
                       rewinds=w.rewinds + 1), [note, StoreCursor(seq)]
    return replace(w, acked_seq=seq, sent_seq=max(w.sent_seq, seq), progress_at=now,
                   inflight=tuple(s for s in w.inflight if s > seq)), [StoreCursor(seq)]


def _timeout(w: Window, now: float, limits: Limits) -> tuple[Window, list[Action]]:
    if not w.inflight or now - w.progress_at < limits.ack_timeout_s:
        return w, []
    note = Note(f"sync: no ack progress for {limits.ack_timeout_s:.1f}s (acked {w.acked_seq}, sent"
                f" {w.sent_seq}); sending again from {w.acked_seq + 1}")
    return replace(w, sent_seq=w.acked_seq, inflight=(), progress_at=now, resends=w.resends + 1), [note]


def _send(w: Window, limits: Limits) -> list[Action]:
    free = limits.max_inflight - len(w.inflight)
    if w.connected and w.sent_seq < w.last_seq and free > 0:
        return [Send(w.sent_seq, free)]
    return []


def next_deadline(w: Window, limits: Limits) -> float | None:
    """When the next resend is due (monotonic seconds), or None with nothing outstanding."""
    return w.progress_at + limits.ack_timeout_s if w.inflight else None
