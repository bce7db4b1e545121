"""Hypothesis strategies for intents and commands over a small SKU space (so rules collide)."""

from hypothesis import strategies as st

from agent import events as ev

SKUS = ["A-1", "B.2", "C:3"]
RIDS = ["r1", "r2", "r3", "r4"]
loc = st.sampled_from(["floor", "backroom"])
qty = st.integers(min_value=1, max_value=20)
sku = st.sampled_from(SKUS)
rid = st.sampled_from(RIDS)

intent = st.one_of(
    st.builds(ev.Receive, sku=sku, qty=qty, location=loc),
    st.builds(ev.Sell, sku=sku, qty=qty, location=loc),
    st.builds(ev.Return, sku=sku, qty=qty, location=loc),
    st.builds(ev.Move, sku=sku, qty=qty, from_=loc, to=loc),
    st.builds(ev.Count, sku=sku, location=loc, counted=st.integers(0, 30)),
    st.builds(ev.Adjust, sku=sku, location=loc, delta=st.integers(-5, 5),
              reason=st.sampled_from(["damaged", "shrink", "found", "correction"])),
    st.builds(ev.Reserve, sku=sku, qty=qty, reservation_id=rid),
    st.builds(ev.ReleaseReservation, reservation_id=rid),
    st.builds(ev.FulfilReservation, reservation_id=rid, location=loc),
)


@st.composite
def commands(draw, max_commands: int = 25):
    n = draw(st.integers(1, max_commands))
    return [ev.AppendCommand(command_id=f"cmd-{i}", events=draw(st.lists(intent, min_size=1, max_size=4)))
            for i in range(n)]
