"""The uplink's rules (sync/rules.py) with a fake clock: no broker, no sleeps, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import given, settings, strategies as st

from sync.rules import (AckArrived, Alarm, BatchSent, ConnectionChanged, CursorStored, Limits, LogGrew,
                        Note, Send, StoreCursor, Tick, Window, decide, next_deadline, start)

STORE = "store-0042"
LIMITS = Limits(max_inflight=3, ack_timeout_s=10.0)
AT = "2026-11-27T13:05:00.123Z"


@dataclass
class Run:
    """Feeds messages to `decide` on a fake monotonic clock; keeps the window and every action."""

    w: Window
    now: float = 100.0
    actions: list = field(default_factory=list)

    def __call__(self, message) -> list:
        self.w, actions = decide(self.w, message, self.now, LIMITS)
        self.actions += actions
        return actions

    def ack(self, seq: int) -> list:
        return self(AckArrived(STORE, seq, AT))

    def send_all(self, size: int = 10) -> list[tuple[int, int]]:
        """Publish what a Send allows, in batches of `size` events, as the shell would."""
        sent = []
        for action in self(Tick()):
            if isinstance(action, Send):
                first = action.after_seq + 1
                for _ in range(action.batches):
                    if first > self.w.last_seq:
                        break
                    last = min(first + size - 1, self.w.last_seq)
                    self(BatchSent(first, last))
                    sent.append((first, last))
                    first = last + 1
        return sent

    def later(self, seconds: float) -> list:
        self.now += seconds
        return self(Tick())


def running(last_seq: int = 100, acked: int = 0) -> Run:
    run = Run(start(acked, None, last_seq, 100.0))
    run(ConnectionChanged(True))
    return run


def sends(actions) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def stores(actions) -> list[StoreCursor]:
    return [a for a in actions if isinstance(a, StoreCursor)]


def test_a_fresh_window_sends_from_the_stored_cursor():
    run = running(last_seq=100, acked=40)
    assert sends(run(Tick())) == [Send(40, 3)]


def test_nothing_is_sent_while_disconnected():
    run = Run(start(0, None, 100, 100.0))
    assert sends(run(Tick())) == []
    assert sends(run(ConnectionChanged(True))) == [Send(0, 3)]


def test_the_window_is_bounded_and_an_ack_frees_it():
    run = running()
    assert run.send_all() == [(1, 10), (11, 20), (21, 30)]
    assert run.w.inflight == (10, 20, 30) and sends(run(Tick())) == []
    assert run(BatchSent(31, 40)) == [] and run.w.sent_seq == 30   # no room: not counted
    actions = run.ack(20)
    assert stores(actions) == [StoreCursor(20, AT)] and sends(actions) == [Send(30, 2)]
    assert run.w.acked_seq == 20 and run.w.inflight == (30,)


def test_a_partial_ack_keeps_its_batch_in_flight():
    run = running()
    run.send_all()
    run.ack(15)
    assert run.w.inflight == (20, 30)


def test_no_resend_before_the_timeout():
    run = running()
    run.send_all()
    assert run.later(9.999) == [] and run.w.resends == 0
    assert next_deadline(run.w, LIMITS) == 110.0


def test_no_ack_progress_for_the_timeout_resends_from_acked_plus_one():
    run = running()
    run.send_all()
    run.now += 4
    run.ack(10)                     # progress at 104: the timer restarts
    run.send_all()                  # the freed slot is filled: 31..40
    assert run.later(9.9) == [] and run.w.resends == 0
    actions = run.later(0.1)
    assert [type(a) for a in actions] == [Note, Send] and actions[1] == Send(10, 3)
    assert "sending again from 11" in actions[0].text
    assert run.w.resends == 1 and run.w.sent_seq == 10 and run.w.inflight == ()
    assert run.send_all()[0] == (11, 20)


def test_an_ack_equal_to_the_cursor_changes_nothing():
    run = running()
    run.send_all()
    run.ack(20)
    run(CursorStored(20, AT))
    before = run.w
    run.now += 5
    assert stores(run.ack(20)) == [] and run.w == before
    run.later(5)
    assert run.w.resends == 1       # the equal ack did not restart the timer


def test_a_failed_cursor_write_is_asked_for_again_by_the_same_ack():
    run = running()
    run.send_all()
    assert stores(run.ack(20)) == [StoreCursor(20, AT)]   # the write fails: no CursorStored
    assert stores(run.ack(20)) == [StoreCursor(20, AT)]   # the redelivered ack asks again
    run(CursorStored(20, AT))
    assert stores(run.ack(20)) == []
    assert run.w.stored_seq == 20 and run.w.last_ack_at == AT


def test_a_lower_ack_rewinds_the_cursor_and_resends_from_there():
    run = running()
    run.send_all()
    run.ack(30)
    run(CursorStored(30, AT))
    actions = run.ack(12)
    assert stores(actions) == [StoreCursor(12, AT)] and sends(actions) == [Send(12, 3)]
    assert any(isinstance(a, Note) and "below our cursor 30" in a.text for a in actions)
    assert (run.w.acked_seq, run.w.sent_seq, run.w.inflight, run.w.rewinds) == (12, 12, (), 1)
    assert run.send_all()[0] == (13, 22)


def test_a_batch_read_before_a_rewind_is_ignored():
    run = running()
    run.send_all()
    run.ack(30)
    run.ack(5)                      # rewinds while 31..40 was being read
    before = run.w
    assert run(BatchSent(31, 40)) == [Send(5, 3)]
    assert run.w == before and run.w.events_sent == 30


def test_an_ack_above_the_log_is_an_alarm_and_never_trusted():
    run = running(last_seq=40)
    run.send_all(size=40)
    run.ack(20)
    run(CursorStored(20, AT))
    actions = run.ack(5000)
    alarms = [a for a in actions if isinstance(a, Alarm)]
    assert len(alarms) == 1 and stores(actions) == []
    assert "sync: ack for store-0042 says 5000 but the log ends at 40; not trusted" in alarms[0].text
    assert (run.w.acked_seq, run.w.stored_seq, run.w.ack_alarms, run.w.alarm) == (20, 20, 1, alarms[0].text)
    run.ack(5000)
    assert run.w.ack_alarms == 2 and run.w.acked_seq == 20
    # Once the log covers the hub's ack (rehydrated from it, say), a trusted ack ends the alarm.
    run(LogGrew(5000))
    assert stores(run.ack(5000)) == [StoreCursor(5000, AT)]
    assert run.w.alarm is None and run.w.ack_alarms == 2


def test_an_ack_up_to_what_was_sent_is_trusted_though_the_log_poll_lags():
    run = running(last_seq=10)
    run(BatchSent(1, 25))           # the read saw events the poll had not reported yet
    assert run.w.last_seq == 25
    assert stores(run.ack(25)) == [StoreCursor(25, AT)] and run.w.ack_alarms == 0


def test_a_disconnect_holds_the_timer_and_a_reconnect_restarts_it():
    run = running()
    run.send_all()
    run.now += 5
    run(ConnectionChanged(False))
    assert next_deadline(run.w, LIMITS) is None
    assert run.later(60) == [] and run.w.resends == 0 and run.w.inflight == (10, 20, 30)
    assert run(ConnectionChanged(True)) == []     # window still full: the session redelivers it
    assert next_deadline(run.w, LIMITS) == run.now + 10
    assert sends(run.later(10)) == [Send(0, 3)] and run.w.resends == 1


def test_a_disconnect_with_room_in_the_window_sends_after_the_reconnect():
    run = running(last_seq=100)
    run(BatchSent(1, 10))
    run(ConnectionChanged(False))
    assert sends(run(Tick())) == []
    assert sends(run(ConnectionChanged(True))) == [Send(10, 2)]


def test_the_log_growing_while_idle_asks_for_a_send():
    run = running(last_seq=0)
    assert run(Tick()) == []
    assert run(LogGrew(5)) == [Send(0, 3)]
    assert run(LogGrew(3)) == [Send(0, 3)] and run.w.last_seq == 5   # logs only grow


# ------------------------------------------------------------------ properties

SEQ = st.integers(0, 60)
message = st.one_of(
    st.builds(LogGrew, SEQ),
    st.builds(AckArrived, st.just(STORE), st.integers(0, 80), st.just(AT)),
    st.builds(CursorStored, SEQ, st.just(AT)),
    st.builds(ConnectionChanged, st.booleans()),
    st.builds(BatchSent, SEQ, SEQ),                         # arbitrary, stale or bogus
    st.just(Tick()),
    st.tuples(st.just("publish"), st.integers(1, 15)),     # the shell publishes what Send allowed
    st.tuples(st.just("wait"), st.floats(0, 15)),
)


@settings(max_examples=400, deadline=None)
@given(acked=st.integers(0, 20), last=st.integers(0, 40), script=st.lists(message, max_size=60))
def test_invariants_hold_for_any_sequence_of_messages(acked, last, script):
    limits = Limits(max_inflight=3, ack_timeout_s=10.0)
    w, now, pending = start(min(acked, last), None, last, 0.0), 0.0, None
    for item in script:
        if isinstance(item, tuple) and item[0] == "wait":
            now += item[1]
            item = Tick()
        elif isinstance(item, tuple):
            if pending is None or pending.after_seq != w.sent_seq or w.sent_seq >= w.last_seq:
                continue
            item = BatchSent(w.sent_seq + 1, min(w.sent_seq + item[1], w.last_seq))
        before = w
        w, actions = decide(w, item, now, limits)
        pending = next((a for a in actions if isinstance(a, Send)), None)
        known = max(before.last_seq, before.sent_seq)
        assert w.acked_seq <= known and w.acked_seq <= w.last_seq
        assert w.acked_seq <= w.sent_seq <= w.last_seq
        assert len(w.inflight) <= limits.max_inflight
        assert list(w.inflight) == sorted(set(w.inflight))
        assert all(w.acked_seq < s <= w.sent_seq for s in w.inflight)
        assert (not w.inflight) or w.inflight[-1] == w.sent_seq
        assert w.resends >= before.resends and w.rewinds >= before.rewinds
        if isinstance(item, AckArrived) and item.acked_seq > known:
            assert w.acked_seq == before.acked_seq and w.ack_alarms == before.ack_alarms + 1
        if isinstance(item, AckArrived) and item.acked_seq == before.acked_seq == before.stored_seq:
            assert replace(w, alarm=before.alarm) == before and w.alarm is None  # it only ends an alarm
        for action in actions:
            if isinstance(action, Send):
                assert w.connected and action.after_seq == w.sent_seq
                assert 0 < action.batches <= limits.max_inflight - len(w.inflight)
            if isinstance(action, StoreCursor):
                assert action.acked_seq == w.acked_seq


# ------------------------------------------------------------- ack marks (epoch, rev)


def marked(run: Run, seq: int, epoch: str | None, rev: int | None) -> list:
    return run(AckArrived(STORE, seq, AT, epoch, rev))


def test_a_crossed_lower_ack_of_the_same_epoch_is_ignored_and_counted():
    run = running()
    run.send_all()
    assert stores(marked(run, 20, "e1", 5)) == [StoreCursor(20, AT, "e1", 5)]
    run(CursorStored(20, AT, "e1", 5))
    actions = marked(run, 10, "e1", 4)        # published before rev 5, arrived after it
    assert actions == [] or not stores(actions)
    assert not [a for a in actions if isinstance(a, Note)]
    assert (run.w.acked_seq, run.w.sent_seq, run.w.rewinds, run.w.stale_acks) == (20, 30, 0, 1)
    assert (run.w.epoch, run.w.rev) == ("e1", 5)


def test_a_lower_ack_of_a_new_epoch_rewinds():
    run = running()
    run.send_all()
    marked(run, 20, "e1", 5)
    run(CursorStored(20, AT, "e1", 5))
    actions = marked(run, 10, "e2", 1)        # the hub's record was restored
    assert stores(actions) == [StoreCursor(10, AT, "e2", 1)]
    assert [a for a in actions if isinstance(a, Note)]
    assert (run.w.acked_seq, run.w.sent_seq, run.w.rewinds, run.w.stale_acks) == (10, 10, 1, 0)
    assert (run.w.epoch, run.w.rev) == ("e2", 1)


def test_an_ack_without_a_mark_follows_the_old_rules_and_clears_the_mark():
    run = running()
    run.send_all()
    marked(run, 20, "e1", 5)
    run(CursorStored(20, AT, "e1", 5))
    actions = marked(run, 10, None, None)      # an older hub: a lower ack rewinds
    assert stores(actions) == [StoreCursor(10, AT, None, None)]
    assert (run.w.acked_seq, run.w.rewinds, run.w.epoch, run.w.rev) == (10, 1, None, None)
    # Half a mark is no mark either.
    run.send_all()
    marked(run, 12, "e1", None)
    assert (run.w.acked_seq, run.w.epoch, run.w.rev) == (12, None, None)


def test_an_equal_seq_with_a_new_mark_is_stored():
    run = running()
    run.send_all()
    marked(run, 20, "e1", 5)
    run(CursorStored(20, AT, "e1", 5))
    assert stores(marked(run, 20, "e1", 5)) == []                       # a restatement
    assert stores(marked(run, 20, "e2", 1)) == [StoreCursor(20, AT, "e2", 1)]


def test_the_mark_comes_back_from_start():
    run = Run(start(20, AT, 100, 100.0, "e1", 5))
    run(ConnectionChanged(True))
    run.send_all()
    marked(run, 10, "e1", 4)
    assert (run.w.acked_seq, run.w.stale_acks) == (20, 1)
    marked(run, 30, "e1", 6)
    assert (run.w.acked_seq, run.w.rev) == (30, 6)


def test_a_stale_ack_above_the_log_is_not_an_alarm():
    run = Run(start(20, AT, 30, 100.0, "e1", 5))
    marked(run, 99, "e1", 3)
    assert (run.w.ack_alarms, run.w.stale_acks, run.w.acked_seq) == (0, 1, 20)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=30))
def test_acks_of_one_epoch_in_any_order_never_rewind(acks):
    """Within one epoch, whatever order the acks arrive in, the cursor follows the highest rev."""
    run = running(last_seq=60)
    run.send_all(size=20)
    # A hub's acks within an epoch: acked_seq grows with rev.
    by_rev = {rev: seq for seq, rev in sorted(acks)}
    seq_of = {}
    top = 0
    for rev in sorted(by_rev):
        top = max(top, by_rev[rev])
        seq_of[rev] = top
    best = None
    for rev in (r for _, r in acks):
        marked(run, seq_of[rev], "e1", rev)
        best = rev if best is None or rev > best else best
        assert run.w.rewinds == 0
        assert run.w.acked_seq == seq_of[best]
