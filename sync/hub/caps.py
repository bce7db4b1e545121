"""Sales caps, pure: validation, calendar periods, and the split of a chain-wide cap.

Nothing here does I/O or reads the clock: times and time zones arrive as arguments (the
shell builds the `zoneinfo.ZoneInfo` objects from `[[stores]] timezone`).

A cap is set per SKU (one cap per SKU: `P/caps/{sku}` is one retained topic):

* scope "store": every store (or only `store_id`) may sell `limit` per period;
* scope "chain": the stores together may sell `limit` per period. The hub splits it into
  per-store allowances (`split`) that it sends in each store's snapshot.

**The chain-wide promise.** A store enforces the last allowance it received, also while
offline and also past its period's end (it rolls the period forward and keeps the
allowance). So once an allowance went out the hub cannot take it back: for each store it
keeps `in_force`, the highest allowance the store may still be acting on (every allowance
published to it, unless the store has reported holding a snapshot version at or after
which the allowances are lower: see sync/hub/capstate.py). Because the agent refuses past
its allowance, a store's `used` never exceeds its `in_force` allowance, so

    sum over stores of max(in_force, used) <= limit

is the invariant. `split` keeps it: it grows a store's allowance only out of
`limit - sum(max(in_force, used))`, the never-promised remainder, and the new in-force
value of each store is max(old in-force, new allowance).

**The split is fair by demand, with a floor.** Each store's target is `used + step`
(`step` = half the equal share, at least 1): every store, busy or quiet, keeps about a
`step` of headroom, so an offline store can still sell `step` more than it had when it
went away, and the other half of the limit stays in the pool for the stores that sell.
When the pool cannot meet every target, it is shared out equally among the stores still
short (water-filling, ties to the lowest allowance then the lowest store id), so a busy
store cannot starve a quiet one of its first `step`.

**Giving unused allowance back.** A store holding more than its target (it sold less than
it was given) is sent a lower allowance (its target, never below what it used). The
units above it stay counted as in force until the store confirms it holds that snapshot
(then the in-force value drops to what that snapshot and any later ones gave): only
then do they return to the pool. At a period's start `used` restarts from 0; the in-force
allowances carry over (an offline store rolls its last allowance forward), so a new
period begins from the allowances already out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Iterable, Mapping

from agent.events import SKU_PATTERN, STORE_ID_PATTERN

PERIODS = ("day", "week", "month")
SCOPES = ("store", "chain")
MAX_LIMIT = 1_000_000_000

SKU = re.compile(SKU_PATTERN)
_STORE = re.compile(STORE_ID_PATTERN)


class CapError(ValueError):
    """A cap that does not fit; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Cap:
    """A SKU's cap as set."""

    sku: str
    limit: int
    period: str
    scope: str = "store"
    store_id: str | None = None

    def applies_to(self, store_id: str) -> bool:
        return self.scope == "chain" or self.store_id is None or self.store_id == store_id


def check(sku: object, limit: object, period: object, scope: object = "store",
          store_id: object = None, v: object = 1, topic_sku: str | None = None,
          stores: Iterable[str] | None = None) -> Cap:
    """Return the Cap these fields describe; raise CapError naming the first field that does not fit.

    `topic_sku`: the SKU of the topic it came on (must equal `sku`); `stores`: the
    configured store ids (a `store_id` must be one of them).
    """
    if v != 1:
        raise CapError("v", f"is {v!r}, expected 1")
    if not isinstance(sku, str) or not SKU.match(sku):
        raise CapError("sku", f"{sku!r} is not a valid SKU")
    if topic_sku is not None and sku != topic_sku:
        raise CapError("sku", f"{sku!r} differs from the topic's {topic_sku!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
        raise CapError("limit", f"{limit!r} is not an integer from 0 to {MAX_LIMIT}")
    if period not in PERIODS:
        raise CapError("period", f"{period!r} is not one of {', '.join(PERIODS)}")
    if scope not in SCOPES:
        raise CapError("scope", f"{scope!r} is not one of {', '.join(SCOPES)}")
    if store_id is not None:
        if scope != "store":
            raise CapError("store_id", "is only allowed with scope store (a chain cap covers every store)")
        if not isinstance(store_id, str) or not _STORE.match(store_id):
            raise CapError("store_id", f"{store_id!r} is not a valid store id")
        if stores is not None and store_id not in set(stores):
            raise CapError("store_id", f"{store_id!r} is not in the hub's [[stores]]")
    return Cap(sku, limit, period, scope, store_id)


# ------------------------------------------------------------------ periods


def period_bounds(period: str, at: float, tz: tzinfo) -> tuple[float, float]:
    """Return the Unix times [start, end) of the calendar period holding `at`, in zone `tz`.

    day: local midnight to midnight; week: Monday 00:00 to the next Monday (ISO weeks);
    month: the 1st 00:00 to the next 1st. Bounds are local wall-clock midnights, so a
    day across a DST change lasts 23 or 25 hours.
    """
    local = datetime.fromtimestamp(at, timezone.utc).astimezone(tz)
    day = local.date()
    if period == "day":
        first, after = day, day + timedelta(days=1)
    elif period == "week":
        first = day - timedelta(days=day.weekday())
        after = first + timedelta(days=7)
    elif period == "month":
        first = day.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        raise CapError("period", f"{period!r} is not one of {', '.join(PERIODS)}")
    return (_midnight(first, tz), _midnight(after, tz))


def _midnight(day, tz: tzinfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def local_day(at: float, tz: tzinfo) -> str:
    """Return the local date (YYYY-MM-DD) of the Unix time `at` in zone `tz`."""
    return datetime.fromtimestamp(at, timezone.utc).astimezone(tz).date().isoformat()


def period_days(period: str, at: float, tz: tzinfo) -> tuple[str, str]:
    """Return the local dates [first, after) of the period holding `at` (for day buckets)."""
    start, end = period_bounds(period, at, tz)
    return local_day(start, tz), local_day(end, tz)


# -------------------------------------------------------------------- split


def step_of(limit: int, stores: int) -> int:
    """The headroom each store is given beyond what it used: half the equal share, at least 1."""
    return max(1, (limit // max(1, stores) + 1) // 2)


def split(limit: int, stores: list[str], in_force: Mapping[str, int], used: Mapping[str, int]) -> dict[str, int]:
    """Return each store's allowance for a chain-wide cap of `limit` (see the module docstring).

    `in_force[s]`: the highest allowance store s may still act on (0: none published);
    `used[s]`: its use this period as far as the hub knows. The result keeps the
    invariant: with in_force' = max(in_force, allowance) per store,
    sum(max(in_force', used)) <= max(limit, sum(max(in_force, used))). An allowance
    is never below `used` (a store past its allowance is sent "0 left", not less).
    """
    step = step_of(limit, len(stores))
    held = {s: max(in_force.get(s, 0), used.get(s, 0)) for s in stores}
    target = {s: used.get(s, 0) + step for s in stores}
    free = limit - sum(held.values())
    short = {s: target[s] - held[s] for s in stores if target[s] > held[s]}
    grant = _share(max(0, free), short, held)
    out = {}
    for s in stores:
        if s in short:
            out[s] = held[s] + grant.get(s, 0)
        else:  # holding at least its target: offer the excess back (counted until confirmed)
            out[s] = max(used.get(s, 0), target[s])
    return out


def _share(free: int, want: Mapping[str, int], held: Mapping[str, int]) -> dict[str, int]:
    """Split `free` units among `want` equally (water-filling), each getting at most its want."""
    grant = {s: 0 for s in want}
    open_ = sorted(want, key=lambda s: (held[s], s))
    while free > 0 and open_:
        each, extra = divmod(free, len(open_))
        if each == 0:  # fewer units than stores: one each, lowest allowance first
            for s in open_[:extra]:
                grant[s] += 1
            return grant
        still = []
        for s in open_:
            give = min(each, want[s] - grant[s])
            grant[s] += give
            free -= give
            if grant[s] < want[s]:
                still.append(s)
        open_ = still
    return grant


def in_force_after(history: list[tuple[int, int]], confirmed_version: int | None) -> int:
    """Return the allowance a store may still act on, from what was published to it.

    `history`: (snapshot version, allowance) pairs published to the store for a SKU, in
    version order (one per change). `confirmed_version`: the snapshot version the store
    reported holding (None: unknown). The store holds the snapshot it confirmed or a
    newer one, so only the allowance in force at that version and later ones count.
    """
    if not history:
        return 0
    if confirmed_version is None:
        return max(a for _, a in history)
    at = [a for v, a in history if v <= confirmed_version]
    later = [a for v, a in history if v > confirmed_version]
    return max(([at[-1]] if at else []) + later, default=0)
