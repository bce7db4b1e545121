"""The chain-cap split and cap periods, pure (sync/hub/caps.py): no I/O, no clock."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.hub import caps


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------- the invariant


class Chain:
    """A model of the hub and its stores around one chain-wide cap.

    The hub knows only what reached it: each store's acked use and the allowances it
    published. Each store acts on the allowance it holds (the agent's rule: a sale
    passes only while used + qty <= allowance), offline too, and applies a delivered
    snapshot only if its version is newer than the one it holds.
    """

    def __init__(self, stores: list[str], limit: int):
        self.stores, self.limit = stores, limit
        self.version = 0
        self.history: dict[str, list[tuple[int, int]]] = {s: [] for s in stores}   # hub: published
        self.confirmed: dict[str, int] = {}                                      # hub: held version, events in
        self.hub_used = {s: 0 for s in stores}
        self.used = {s: 0 for s in stores}                                       # store: true use
        self.held: dict[str, tuple[int, int]] = {}                               # store: (version, allowance)
        self.inbox: dict[str, list[tuple[int, int]]] = {s: [] for s in stores}   # published, not yet delivered
        self.online = {s: True for s in stores}
        self.reports: dict[str, tuple[int, int]] = {}                            # (held version, use then)
        self.refused = 0

    def publish(self) -> None:
        self.version += 1
        in_force = {s: caps.in_force_after(self.history[s], self.confirmed.get(s)) for s in self.stores}
        allowance = caps.split(self.limit, self.stores, in_force, self.hub_used)
        for s in self.stores:
            if not self.history[s] or self.history[s][-1][1] != allowance[s]:
                self.history[s].append((self.version, allowance[s]))
            self.inbox[s].append((self.version, allowance[s]))

    def sell(self, s: str, qty: int) -> None:
        if s not in self.held or self.used[s] + qty > self.held[s][1]:
            self.refused += 1
            return
        self.used[s] += qty

    def release(self, s: str, qty: int) -> None:
        self.used[s] = max(0, self.used[s] - qty)

    def deliver(self, s: str, skip: bool) -> None:
        if not self.online[s] or not self.inbox[s]:
            return
        message = self.inbox[s][-1] if skip else self.inbox[s][0]   # retained: only the latest may arrive
        self.inbox[s] = [m for m in self.inbox[s] if m[0] > message[0]]
        if s not in self.held or message[0] > self.held[s][0]:
            self.held[s] = message

    def ack(self, s: str) -> None:
        if self.online[s]:
            self.hub_used[s] = self.used[s]
        report = self.reports.get(s)
        if report is not None and self.hub_used[s] >= report[1]:   # the hub holds its events up to then
            self.confirmed[s] = max(self.confirmed.get(s, 0), report[0])
            del self.reports[s]

    def status(self, s: str) -> None:
        if self.online[s] and s in self.held:
            self.reports[s] = (self.held[s][0], self.used[s])

    def could_act_on(self, s: str) -> int:
        """The largest allowance store s holds or may still receive."""
        held = self.held.get(s, (0, 0))
        pending = [a for v, a in self.inbox[s] if v > held[0]]
        return max([held[1], *pending])


ops = st.lists(st.tuples(st.sampled_from(["publish", "sell", "release", "deliver", "ack", "status", "toggle"]),
                         st.integers(0, 3), st.integers(1, 3), st.booleans()), max_size=120)


@settings(max_examples=400, deadline=None)
@given(st.integers(2, 4), st.integers(0, 40), ops)
def test_no_sequence_of_sales_deliveries_and_offline_periods_passes_the_chain_limit(n, limit, steps):
    """sum over stores of max(allowance still in force, used) <= limit, after every step."""
    chain = Chain([f"s{i}" for i in range(n)], limit)
    for op, who, qty, flag in steps:
        s = chain.stores[who % n]
        if op == "publish":
            chain.publish()
        elif op == "sell":
            chain.sell(s, qty)
        elif op == "release":
            chain.release(s, qty)
        elif op == "deliver":
            chain.deliver(s, flag)
        elif op == "ack":
            chain.ack(s)
        elif op == "status":
            chain.status(s)
        else:
            chain.online[s] = not chain.online[s]
        # Every promise still out, or what was used beyond it, fits in the limit.
        assert sum(max(chain.could_act_on(x), chain.used[x]) for x in chain.stores) <= limit
        # The hub's own bookkeeping never counts less than a store may act on.
        for x in chain.stores:
            assert caps.in_force_after(chain.history[x], chain.confirmed.get(x)) >= chain.could_act_on(x)


def test_online_stores_use_the_whole_limit_while_one_is_offline():
    chain = Chain(["a", "b", "c"], 12)
    chain.publish()
    for s in chain.stores:
        chain.deliver(s, True)
    chain.online["c"] = False
    for _ in range(40):                       # a and b sell whatever they are given
        for s in ("a", "b"):
            chain.sell(s, 1)
            chain.ack(s)
        chain.publish()
        for s in ("a", "b"):
            chain.deliver(s, True)
    offline_allowance = chain.held["c"][1]
    assert offline_allowance == caps.step_of(12, 3)
    assert chain.used["a"] + chain.used["b"] == 12 - offline_allowance
    for _ in range(5):
        chain.sell("c", 1)                    # c sells its allowance offline, and no more
    assert chain.used["c"] == offline_allowance
    assert sum(chain.used.values()) == 12


def test_an_unused_allowance_goes_back_to_the_pool_only_once_the_store_confirms_it():
    chain = Chain(["a", "b"], 8)              # step 2
    chain.publish()
    for s in chain.stores:
        chain.deliver(s, True)
    for _ in range(2):                        # b sells 4 and is given 6; a holds 2, nothing is free
        chain.sell("b", 2)
        chain.ack("b")
        chain.publish()
        chain.deliver("b", True)
    assert chain.held["b"][1] == 6 and chain.held["a"][1] == 2
    chain.release("b", 2)                     # two of b's reservations are released: it uses 2
    chain.ack("b")
    chain.sell("a", 2)
    chain.ack("a")
    chain.publish()
    # b is offered its use + step (4); a cannot grow yet, b may not have seen the offer.
    assert chain.inbox["b"][-1][1] == 4 and chain.inbox["a"][-1][1] == 2
    chain.deliver("b", True)
    chain.publish()
    assert chain.inbox["a"][-1][1] == 2       # b holds 4 now, but the hub does not know it
    chain.status("b")                         # b reports the version it holds ...
    chain.ack("b")                            # ... and the hub has its events up to then
    chain.publish()
    assert chain.inbox["a"][-1][1] == 4       # the 2 units b gave back went to a
    chain.deliver("a", True)
    chain.sell("a", 2)
    assert chain.used == {"a": 4, "b": 2} and chain.could_act_on("b") == 4


def test_split_grows_only_out_of_the_never_promised_remainder():
    stores = ["a", "b", "c"]
    out = caps.split(9, stores, {"a": 5, "b": 2, "c": 0}, {"a": 5, "b": 0, "c": 0})
    # held: 5 + 2 + 0 = 7, so 2 are free: a (short by step 2) and c (short by 2) share them.
    assert out == {"a": 6, "b": 2, "c": 1}
    # Nothing free: nobody grows; a store above its target is offered less (still in force).
    assert caps.split(7, stores, {"a": 5, "b": 2, "c": 0}, {"a": 5, "b": 0, "c": 0}) == {"a": 5, "b": 1, "c": 0}
    # Used beyond the promise (sales before the cap was known) is never shown as more than 0 left.
    assert caps.split(4, ["a", "b"], {}, {"a": 6, "b": 0}) == {"a": 6, "b": 0}


# ----------------------------------------------------------------- periods


@pytest.mark.parametrize("period, at, zone, start, end", [
    ("week", "2026-12-03T11:00:00Z", "Europe/Paris", "2026-11-29T23:00:00Z", "2026-12-06T23:00:00Z"),
    ("day", "2026-12-03T23:30:00Z", "Europe/Paris", "2026-12-03T23:00:00Z", "2026-12-04T23:00:00Z"),
    ("month", "2026-12-03T11:00:00Z", "UTC", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    # A day across the spring DST change lasts 23 hours in its zone.
    ("day", "2026-03-29T12:00:00Z", "Europe/Paris", "2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"),
    ("week", "2026-12-03T11:00:00Z", "America/New_York", "2026-11-30T05:00:00Z", "2026-12-07T05:00:00Z"),
])
def test_periods_are_calendar_periods_in_the_store_zone(period, at, zone, start, end):
    assert caps.period_bounds(period, ts(at), ZoneInfo(zone)) == (ts(start), ts(end))


def test_local_day_buckets_follow_the_zone():
    assert caps.local_day(ts("2026-12-03T23:30:00Z"), ZoneInfo("Europe/Paris")) == "2026-12-04"
    assert caps.period_days("week", ts("2026-12-03T23:30:00Z"), ZoneInfo("Europe/Paris")) == ("2026-11-30",
                                                                                                "2026-12-07")
    assert caps.local_day(ts("2026-12-03T23:30:00Z"), timezone.utc) == "2026-12-03"


@pytest.mark.parametrize("fields, field", [
    ({"sku": "bad sku"}, "sku"), ({"limit": -1}, "limit"), ({"limit": "2"}, "limit"), ({"limit": True}, "limit"),
    ({"period": "year"}, "period"), ({"scope": "region"}, "scope"),
    ({"scope": "chain", "store_id": "store-a"}, "store_id"), ({"store_id": "store-z"}, "store_id"),
    ({"v": 2}, "v"),
])
def test_a_cap_that_does_not_fit_is_refused_naming_the_field(fields, field):
    good = {"sku": "SKU-1", "limit": 2, "period": "week", "scope": "store", "store_id": None, "v": 1}
    with pytest.raises(caps.CapError) as err:
        caps.check(**{**good, **fields}, stores=["store-a"])
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
