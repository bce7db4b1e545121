"""Sales caps in the pure core: the cap a snapshot sends, its period, and what counts as usage.

Pure like agent/inventory.py (which uses these in decide and evolve): no I/O, no clock;
times arrive as RFC 3339 strings. Usage is counted per 15-minute slot of `recorded_at`
(every time zone's offset is a multiple of 15 minutes, so a calendar period's bounds fall
on slot bounds); the log stores the same slots in `cap_usage` (agent/schema.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import msgspec

from agent import events as ev
from common.clock import parse_rfc3339, rfc3339

# ------------------------------------------------------------------------ time

SLOT_MS = 900_000   # cap usage is counted per 15 minutes: every time zone's offset is a multiple


@functools.lru_cache(maxsize=256)
def ms_of(text: str) -> int:
    """Return the Unix time in milliseconds of an RFC 3339 string; raises ValueError."""
    return round(parse_rfc3339(text) * 1000)


def time_of(ms: int) -> str:
    """Format Unix milliseconds as the agent writes times (RFC 3339 UTC, milliseconds)."""
    return rfc3339(ms / 1000)


def slot_of(text: str) -> int:
    """Return the 15-minute usage slot a time falls in."""
    return ms_of(text) // SLOT_MS


# ------------------------------------------------------------------------ caps


class Cap(msgspec.Struct, frozen=True):
    """A SKU's sales cap as the hub's snapshot sent it (docs/availability.md); decoded from sync.db as is."""

    limit: int
    scope: Literal["store", "chain"]
    period: Literal["day", "week", "month"]
    period_start: str
    period_end: str
    allowance: int


@dataclass(frozen=True)
class Window:
    """The cap period that contains a given instant, in ms and in usage slots."""

    start: str
    end: str
    first_slot: int   # the slots counted: first_slot <= slot < end_slot
    end_slot: int


def cap_window(cap: Cap, now: str) -> Window:
    """Return the period of `cap` that contains `now`.

    The hub sends the current period; when `now` is outside it (the store was offline
    past `period_end`, or the clock went back) the period moves by whole periods of the
    same length, keeping the allowance. Slots whose start lies in [start, end) count.
    """
    start, end, at = ms_of(cap.period_start), ms_of(cap.period_end), ms_of(now)
    length = max(end - start, 1)
    if not start <= at < end:
        start += (at - start) // length * length
        end = start + length
    return Window(time_of(start), time_of(end), -(-start // SLOT_MS), -(-end // SLOT_MS))


def usage_change(event: ev.AnyEvent, opened_at: str | None) -> tuple[str, int, int] | None:
    """Return (sku, slot, delta) an event adds to cap usage, or None.

    `opened_at` is when the reservation a release closes was recorded (None: not known).

    `sold` and `reserved` add their qty in the slot they were recorded in; a release takes
    the reservation's qty back from the slot the reservation was recorded in (a
    reservation made in a period and released gives that period's allowance back).
    Fulfilment changes nothing: the reservation already counted.
    """
    if isinstance(event, (ev.Sold, ev.Reserved)):
        return event.sku, slot_of(event.recorded_at), event.qty
    if isinstance(event, ev.ReservationReleased) and opened_at:
        return event.sku, slot_of(opened_at), -event.qty
    return None
