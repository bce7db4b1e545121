"""The pure inventory core: decide what a command means, evolve state by an event.

Nothing here does I/O, reads the clock or makes ids: `now` and `new_id` arrive as
arguments. The log (agent/log.py) loads the state a batch needs, calls `decide`, stores
the events and folds them with `evolve`; tests fold with the same functions.

Every event's effect on stock is a fixed delta per location plus a delta on `reserved`
(`effect`), computed from the event alone: `counted` carries its `variance`, and the
reservation events carry the reservation's sku and qty. That is what lets SQLite rebuild
and time-travel the projection with plain sums.

Sales caps: `Inventory.caps` holds the allowance of each capped SKU a command touches
(read by the shell from the hub's snapshot at decide time) and `Inventory.usage` the
cap usage the log counted, per 15-minute slot of `recorded_at` (agent/caps.py). A
`sold` or `reserved` that would take a SKU's usage in the current period past its
allowance is refused (`sales_cap_reached`). Leases: a reservation may carry
`expires_at`; closing it at or after that instant is refused (`lease_expired`) except by
the release that says `reason: expired`, which is only allowed then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import msgspec

from agent import events as ev
# Re-exported: the core's callers and tests reach the cap types through the core.
from agent.caps import SLOT_MS, Cap, Window, cap_window, ms_of, slot_of, time_of, usage_change  # noqa: F401


class Refused(Exception):
    """A command the store's rules refuse. Nothing of it is appended.

    `code` is the API error code, `status` the HTTP status, `field` the offending field.
    """

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 409,
                 extra: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status
        self.extra = extra   # more members of the error object (a cap refusal names its cap)


@dataclass
class Stock:
    floor: int = 0
    backroom: int = 0
    reserved: int = 0
    last_seq: int = 0

    @property
    def available(self) -> int:
        return max(0, self.floor + self.backroom - self.reserved)

    def on_hand(self, location: str) -> int:
        return self.floor if location == "floor" else self.backroom


@dataclass
class Reservation:
    reservation_id: str
    sku: str
    qty: int
    status: str = "open"  # open | released | fulfilled
    opened_seq: int = 0
    closed_seq: int | None = None
    opened_at: str | None = None    # the reserved event's recorded_at
    expires_at: str | None = None   # the lease's end; None: no lease


@dataclass
class Inventory:
    """The state decide reads and evolve writes: stock per SKU and reservations.

    The log hands decide a partial Inventory holding only the SKUs and reservations a
    batch touches; a missing SKU means no event has touched it yet.
    """

    store_id: str
    last_seq: int = 0
    stock: dict[str, Stock] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    caps: dict[str, Cap] = field(default_factory=dict)
    # sku -> {slot: qty}: cap usage; the shell loads the current period's slots of capped SKUs.
    usage: dict[str, dict[int, int]] = field(default_factory=dict)

    def stock_of(self, sku: str) -> Stock:
        """Return the SKU's stock row, creating a zero row on first touch."""
        row = self.stock.get(sku)
        if row is None:
            row = self.stock[sku] = Stock()
        return row

    def peek(self, sku: str) -> Stock:
        """Return the SKU's stock row for reading (a zero row, not stored, on first touch)."""
        return self.stock.get(sku) or Stock()

    def reservation(self, reservation_id: str) -> Reservation | None:
        return self.reservations.get(reservation_id)

    def usage_of(self, sku: str) -> dict[int, int]:
        """Return the SKU's usage slots for writing (an empty dict on first touch)."""
        slots = self.usage.get(sku)
        if slots is None:
            slots = self.usage[sku] = {}
        return slots

    def used(self, sku: str, window: Window) -> int:
        """Return the SKU's cap usage in `window`."""
        return self.used_in(sku, window)

    def used_in(self, sku: str, window: Window) -> int:
        slots = self.usage.get(sku)
        if not slots:
            return 0
        return sum(n for slot, n in slots.items() if window.first_slot <= slot < window.end_slot)

    def used_before(self, sku: str, window: Window) -> int:
        """Return the usage before the command being decided (the same, outside an overlay)."""
        return self.used(sku, window)


class Effect(NamedTuple):
    """What one event does to its SKU's projection row."""

    sku: str
    floor: int
    backroom: int
    reserved: int


def _at(location: str, qty: int, sku: str, reserved: int = 0) -> Effect:
    return Effect(sku, qty, 0, reserved) if location == "floor" else Effect(sku, 0, qty, reserved)


def effect(event: ev.AnyEvent) -> Effect:
    """Return the stock delta an event causes; depends on the event alone."""
    match event:
        case ev.Received() | ev.Returned():
            return _at(event.location, event.qty, event.sku)
        case ev.Sold():
            return _at(event.location, -event.qty, event.sku)
        case ev.Moved():
            out, into = _at(event.from_, -event.qty, event.sku), _at(event.to, event.qty, event.sku)
            return Effect(event.sku, out.floor + into.floor, out.backroom + into.backroom, 0)
        case ev.Counted():
            return _at(event.location, event.variance, event.sku)
        case ev.Adjusted():
            return _at(event.location, event.delta, event.sku)
        case ev.Reserved():
            return Effect(event.sku, 0, 0, event.qty)
        case ev.ReservationReleased():
            return Effect(event.sku, 0, 0, -event.qty)
        case ev.ReservationFulfilled():
            return _at(event.location, -event.qty, event.sku, reserved=-event.qty)
    raise TypeError(f"not an event: {event!r}")


def evolve(state: Inventory, event: ev.AnyEvent) -> Inventory:
    """Apply one event to `state` in place and return it (so folds read naturally)."""
    _apply(state, event)
    return state


def _apply(state: Inventory, event: ev.AnyEvent) -> Effect:
    """Apply one event to `state` in place; return its effect."""
    delta = effect(event)
    row = state.stock_of(delta.sku)
    row.floor += delta.floor
    row.backroom += delta.backroom
    row.reserved += delta.reserved
    row.last_seq = event.seq
    match event:
        case ev.Sold():
            _count(state, event, None)
        case ev.Reserved():
            expires = event.expires_at if event.expires_at is not msgspec.UNSET else None
            state.reservations[event.reservation_id] = Reservation(
                event.reservation_id, event.sku, event.qty, "open", event.seq, None, event.recorded_at, expires
            )
            _count(state, event, None)
        case ev.ReservationReleased() | ev.ReservationFulfilled():
            res = state.reservation(event.reservation_id)
            res.status = "released" if isinstance(event, ev.ReservationReleased) else "fulfilled"
            res.closed_seq = event.seq
            state.reservations[event.reservation_id] = res
            _count(state, event, res)
    state.last_seq = event.seq
    return delta


def _count(state: Inventory, event: ev.AnyEvent, reservation: Reservation | None) -> None:
    change = usage_change(event, reservation.opened_at if reservation is not None else None)
    if change is not None:
        sku, slot, delta = change
        slots = state.usage_of(sku)
        slots[slot] = slots.get(slot, 0) + delta


class _Overlay(Inventory):
    """A copy-on-write view of an Inventory, so a refused command leaves it untouched."""

    def __init__(self, base: Inventory):
        super().__init__(base.store_id, base.last_seq, caps=base.caps)
        self._base = base

    def stock_of(self, sku: str) -> Stock:
        row = self.stock.get(sku)
        if row is None:
            src = self._base.stock.get(sku)
            row = self.stock[sku] = Stock(**vars(src)) if src else Stock()
        return row

    def peek(self, sku: str) -> Stock:
        return self.stock.get(sku) or self._base.peek(sku)

    def reservation(self, reservation_id: str) -> Reservation | None:
        res = self.reservations.get(reservation_id)
        if res is None:
            src = self._base.reservation(reservation_id)
            if src is not None:
                res = self.reservations[reservation_id] = Reservation(**vars(src))
        return res

    def usage_of(self, sku: str) -> dict[int, int]:
        slots = self.usage.get(sku)
        if slots is None:
            slots = self.usage[sku] = dict(self._base.usage.get(sku) or {})
        return slots

    def used(self, sku: str, window: Window) -> int:
        return (self if sku in self.usage else self._base).used_in(sku, window)

    def used_before(self, sku: str, window: Window) -> int:
        return self._base.used(sku, window)


def decide(
    state: Inventory,
    command: ev.AppendCommand,
    now: str,
    new_id: Callable[[], str],
) -> list[ev.AnyEvent]:
    """Turn a command into the events to append, numbered from `state.last_seq + 1`.

    Intents are decided in order, each seeing the effect of the ones before it. Does
    not modify `state`. Raises Refused (naming the field) when any intent is refused;
    then no event of the command may be appended.
    """
    return [event for event, _ in _decide(state, command, now, new_id)[0]]


def decide_and_apply(
    state: Inventory,
    command: ev.AppendCommand,
    now: str,
    new_id: Callable[[], str],
) -> list[tuple[ev.AnyEvent, Effect]]:
    """Like `decide`, and on success leave `state` evolved by the events (one fold, not two).

    Returns each event with its `effect`. Raises Refused with `state` untouched.
    """
    intents = command.events
    if len(intents) == 1:
        # A lone intent is refused before anything is applied, so it needs no
        # copy-on-write view: decide on `state` itself, then apply.
        event = _decide_one(state, intents[0], _envelope(state, command, intents[0], now, new_id), "events[0]")
        return [(event, _apply(state, event))]
    decided, view = _decide(state, command, now, new_id)
    state.stock.update(view.stock)
    state.reservations.update(view.reservations)
    state.usage.update(view.usage)
    state.last_seq = view.last_seq
    return decided


def _envelope(state: Inventory, command: ev.AppendCommand, intent: ev.AnyIntent, now: str,
              new_id: Callable[[], str]) -> dict:
    return dict(
        seq=state.last_seq + 1,
        event_id=new_id(),
        store_id=state.store_id,
        occurred_at=intent.occurred_at or now,
        recorded_at=now,
        command_id=command.command_id,
    )


def _decide(state: Inventory, command: ev.AppendCommand, now: str,
            new_id: Callable[[], str]) -> tuple[list[tuple[ev.AnyEvent, Effect]], "_Overlay"]:
    view = _Overlay(state)
    out: list[tuple[ev.AnyEvent, Effect]] = []
    for index, intent in enumerate(command.events):
        event = _decide_one(view, intent, _envelope(view, command, intent, now, new_id), f"events[{index}]")
        out.append((event, _apply(view, event)))
    return out, view


def _decide_one(view: Inventory, intent: ev.AnyIntent, env: dict, where: str) -> ev.AnyEvent:
    match intent:
        case ev.Receive():
            return ev.Received(**env, sku=intent.sku, qty=intent.qty, location=intent.location, ref=intent.ref)
        case ev.Return():
            return ev.Returned(**env, sku=intent.sku, qty=intent.qty, location=intent.location, ref=intent.ref)
        case ev.Sell():
            _check_cap(view, intent.sku, intent.qty, env["recorded_at"], where)
            after = view.peek(intent.sku).on_hand(intent.location) - intent.qty
            return ev.Sold(
                **env, sku=intent.sku, qty=intent.qty, location=intent.location,
                ref=intent.ref, negative_stock=after < 0,
            )
        case ev.Move():
            if intent.from_ == intent.to:
                raise Refused("invalid", f"{where}: from and to are both {intent.to!r}", f"{where}.to", 422)
            return ev.Moved(**env, sku=intent.sku, qty=intent.qty, from_=intent.from_, to=intent.to)
        case ev.Count():
            before = view.peek(intent.sku).on_hand(intent.location)
            return ev.Counted(
                **env, sku=intent.sku, location=intent.location,
                counted=intent.counted, variance=intent.counted - before,
            )
        case ev.Adjust():
            if intent.delta == 0:
                raise Refused("invalid", f"{where}: delta must be non-zero", f"{where}.delta", 422)
            return ev.Adjusted(**env, sku=intent.sku, location=intent.location, delta=intent.delta, reason=intent.reason)
        case ev.Reserve():
            if view.reservation(intent.reservation_id) is not None:
                raise Refused(
                    "reservation_exists",
                    f"{where}: reservation {intent.reservation_id!r} was already used",
                    f"{where}.reservation_id",
                )
            available = view.peek(intent.sku).available
            if intent.qty > available:
                raise Refused(
                    "insufficient_stock",
                    f"{where}: cannot reserve {intent.qty} of {intent.sku}: {available} available",
                    f"{where}.qty",
                )
            _check_cap(view, intent.sku, intent.qty, env["recorded_at"], where)
            expires = _lease_end(intent, env["recorded_at"], where)
            return ev.Reserved(**env, sku=intent.sku, qty=intent.qty, reservation_id=intent.reservation_id,
                               expires_at=expires)
        case ev.ReleaseReservation() | ev.FulfilReservation():
            res = _open_reservation(view, intent.reservation_id, where)
            reason = getattr(intent, "reason", msgspec.UNSET)
            _check_lease(res, env["recorded_at"], reason == ev.EXPIRED, where)
            if isinstance(intent, ev.ReleaseReservation):
                return ev.ReservationReleased(**env, reservation_id=res.reservation_id, sku=res.sku, qty=res.qty,
                                              reason=reason)
            return ev.ReservationFulfilled(
                **env, reservation_id=res.reservation_id, location=intent.location, sku=res.sku, qty=res.qty
            )
    raise TypeError(f"not an intent: {intent!r}")


def _check_cap(view: Inventory, sku: str, qty: int, now: str, where: str) -> None:
    """Refuse a sale or reservation that would take the SKU past its allowance this period."""
    cap = view.caps.get(sku)
    if cap is None:
        return
    window = cap_window(cap, now)
    if view.used(sku, window) + qty <= cap.allowance:
        return
    # `left` is what the whole command could have had: the usage before it, not the
    # usage after its own earlier intents of this SKU.
    left = max(0, cap.allowance - view.used_before(sku, window))
    raise Refused(
        "sales_cap_reached",
        f"{sku}: limit {cap.limit} per {cap.period}, {left} left ({cap.period} from {window.start})",
        f"{where}.qty",
        extra={"sku": sku, "limit": cap.limit, "period": cap.period, "period_start": window.start,
               "period_end": window.end, "scope": cap.scope, "allowance": cap.allowance, "left": left},
    )


def _lease_end(intent: ev.Reserve, now: str, where: str) -> str | msgspec.UnsetType:
    """Return the lease's end in the agent's time format, or UNSET for no lease."""
    if intent.ttl_s is not msgspec.UNSET:
        return time_of(ms_of(now) + intent.ttl_s * 1000)
    if intent.expires_at is msgspec.UNSET:
        return msgspec.UNSET
    end = ms_of(intent.expires_at)
    if end <= ms_of(now):
        raise Refused("invalid", f"{where}: expires_at {intent.expires_at} is not after now ({now})",
                      f"{where}.expires_at", 422)
    return time_of(end)


def lease_expired(res: Reservation, now: str) -> bool:
    """True when the reservation is a lease whose end is at or before `now`."""
    return res.expires_at is not None and ms_of(now) >= ms_of(res.expires_at)


def _check_lease(res: Reservation, now: str, by_expiry: bool, where: str) -> None:
    expired = lease_expired(res, now)
    if expired and not by_expiry:
        raise Refused(
            "lease_expired",
            f"{where}: the lease on reservation {res.reservation_id!r} expired at {res.expires_at}",
            f"{where}.reservation_id",
            extra={"reservation_id": res.reservation_id, "expires_at": res.expires_at},
        )
    if by_expiry and not expired:
        until = f"runs until {res.expires_at}" if res.expires_at else "has no lease"
        raise Refused(
            "lease_not_expired",
            f"{where}: reason {ev.EXPIRED!r} but reservation {res.reservation_id!r} {until}",
            f"{where}.reason",
        )


def _open_reservation(view: Inventory, reservation_id: str, where: str) -> Reservation:
    res = view.reservation(reservation_id)
    if res is None:
        raise Refused(
            "unknown_reservation", f"{where}: no reservation {reservation_id!r}", f"{where}.reservation_id"
        )
    if res.status != "open":
        raise Refused(
            "reservation_closed",
            f"{where}: reservation {reservation_id!r} is already {res.status}",
            f"{where}.reservation_id",
        )
    return res


def skus_touched(command: ev.AppendCommand) -> tuple[set[str], set[str]]:
    """Return the SKUs and reservation ids a command's decision needs to read."""
    skus: set[str] = set()
    rids: set[str] = set()
    for intent in command.events:
        sku = getattr(intent, "sku", None)
        if sku is not None:
            skus.add(sku)
        rid = getattr(intent, "reservation_id", None)
        if rid is not None:
            rids.add(rid)
    return skus, rids


def fold(store_id: str, events: list[ev.AnyEvent]) -> Inventory:
    """Replay events from nothing (the reference the stored projection must equal)."""
    state = Inventory(store_id)
    for event in events:
        evolve(state, event)
    return state
