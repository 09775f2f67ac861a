"""The shaper's decisions (scistream/s2ds/shaping.py), without sockets, pipes or a clock.

Besides examples, a toy of what the shaper's system calls meet (a socket queue of segments, a pipe
of a few slots, a destination that fills up) checks that the decisions deliver every byte and then
the FIN, whatever the segment sizes and the number of slots: the bug where a pipe's EAGAIN was
taken for a drained socket stalls in it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scistream.s2ds.shaping import (
    BURST,
    QUANTUM_FLOOR,
    UNLIMITED_SHARE,
    Bucket,
    Finish,
    Flow,
    Read,
    Turns,
    Write,
    _but,
    share,
    step,
    wakeup,
)

# --- the bucket ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "quantum"),
    [
        (125, 12, 12),  # 1 kb/s: a tenth of a second, not the 16 KiB (131 s) of a fixed floor
        (12_500, 1250, 1024),  # 100 kb/s: the floor of a read
        (1_250_000, 125_000, 6250),  # the default 10 Mbit/s: 5 ms of it per read
        (625_000_000, 62_500_000, 3_125_000),  # 5 Gbit/s
    ],
)
def test_burst_and_quantum_follow_the_rate(rate, burst, quantum):
    bucket = Bucket.full(rate, 0.0)
    assert (bucket.burst, bucket.quantum, bucket.tokens) == (burst, quantum, burst)
    assert bucket.burst <= rate * BURST


@pytest.mark.parametrize("rate", [-1, 1.5, True, "10"])
def test_a_rate_is_a_whole_number_of_bytes_per_second(rate):
    with pytest.raises(ValueError, match="whole number"):
        Bucket.full(rate, 0.0)


def test_no_rate_grants_everything_at_once_and_never_waits():
    bucket = Bucket.full(0, 5.0)
    assert bucket.unlimited
    assert bucket.grant(10**9) == 10**9
    assert bucket.take(10**9) == bucket
    assert bucket.due(10**9) == 5.0
    assert share(bucket, 3) == UNLIMITED_SHARE


def test_nothing_is_granted_below_a_quantum():
    bucket = _but(Bucket.full(1_250_000, 0.0), tokens=6249.0)
    assert bucket.grant(100_000) == 0  # a piece of 6249 bytes would be a waste of a read
    assert bucket.grant(6000) == 6000  # but what is wanted may be less than a quantum
    assert bucket.refill(0.001).grant(100_000) == 7499  # 1 ms later: everything there is


def test_an_empty_bucket_is_due_when_a_quantum_has_come():
    bucket = Bucket.full(1_250_000, 10.0)
    empty = bucket.take(bucket.grant(10**9))
    assert empty.tokens == 0
    assert empty.due(10**9) == pytest.approx(10.005)  # 6250 bytes of 1.25 MB/s
    assert empty.due(1000) == pytest.approx(10.0008)  # or less, when less is wanted
    assert empty.refill(10.005).grant(10**9) == 6250


def test_a_refill_stops_at_the_burst_and_never_goes_back():
    bucket = Bucket.full(125, 0.0).take(12)
    assert bucket.refill(3600.0).tokens == 12  # an hour of silence: still a tenth of a second
    later = bucket.refill(1.0)
    assert later.refill(0.5) == later


@settings(max_examples=300, deadline=None)
@given(
    rate=st.integers(1, 10**9),
    steps=st.lists(st.tuples(st.floats(0, 0.2), st.integers(0, 10**9), st.floats(0, 1)), max_size=60),
)
def test_no_window_gets_more_than_the_rate_and_one_burst(rate, steps):
    """Whatever is asked and whenever: bytes granted in [t1, t2] <= rate * (t2 - t1) + burst."""
    bucket = Bucket.full(rate, 0.0)
    now, taken = 0.0, []
    for dt, want, used in steps:
        now += dt
        bucket = bucket.refill(now)
        granted = bucket.grant(want)
        assert granted == 0 or granted >= min(want, bucket.quantum)  # never a tiny piece
        n = int(granted * used)  # a read may move less than it was allowed
        bucket = bucket.take(n)
        assert bucket.tokens > -1e-5
        taken.append((now, n))
    for i, (start, _) in enumerate(taken):
        total = 0
        for end, n in taken[i:]:
            total += n
            assert total <= rate * (end - start) + bucket.burst + 1e-6 * rate


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 10**9), tokens=st.floats(0, 1), want=st.integers(1, 10**9))
def test_due_is_when_a_grant_comes(rate, tokens, want):
    bucket = _but(Bucket.full(rate, 1.0), tokens=int(Bucket.full(rate, 1.0).burst * tokens))
    due = bucket.due(want)
    assert due >= 1.0
    later = bucket.refill(due + 1e-9)
    assert later.grant(want) >= min(want, bucket.quantum)
    if due > 1.0:
        assert bucket.refill((1.0 + due) / 2).grant(want) == 0  # and not before


# --- one flow ------------------------------------------------------------------------------------

FAST = Bucket.full(0, 0.0)


def test_the_pipe_is_emptied_before_more_is_read():
    flow = Flow(capacity=65536).read(1000)
    assert step(flow, FAST, 10**9) == Write(1000)
    flow = flow.wrote(400)
    assert step(flow, FAST, 10**9) == Write(600)
    flow = flow.write_blocked()
    assert step(flow, FAST, 10**9) == Read(65536 - 600)  # while the destination is full


def test_the_fin_follows_the_last_byte_before_it():
    flow = Flow(capacity=65536).read(10).read(0)
    assert flow.eof
    assert step(flow, FAST, 10**9) == Write(10)
    blocked = flow.write_blocked()
    assert step(blocked, FAST, 10**9) is None  # not the FIN: 10 bytes are still in the pipe
    with pytest.raises(ValueError, match="FIN"):
        blocked.finished()
    flow = flow.wrote(10)
    assert step(flow, FAST, 10**9) == Finish()
    flow = flow.finished()
    assert flow.shut and step(flow, FAST, 10**9) is None
    with pytest.raises(ValueError):
        flow.read(5)  # nothing comes after a FIN


def test_a_read_that_blocks_into_an_empty_pipe_found_the_socket_drained():
    flow = Flow(capacity=65536).read_blocked()
    assert not flow.readable and flow.room == 0
    assert step(flow, FAST, 10**9) is None
    assert flow.woken(readable=True, writable=False).room == 65536  # until the next event


def test_a_read_that_blocks_while_the_pipe_holds_data_may_have_found_the_pipe_full():
    """Two slots of 100-byte segments: 200 bytes in a pipe of 8192 fill it. That EAGAIN says
    nothing about the socket, whose edge may never come again: read again after a write."""
    flow = Flow(capacity=8192).read(100).read(100).write_blocked().read_blocked()
    assert flow.readable and flow.pipe_full
    assert flow.room == 0 and step(flow, FAST, 10**9) is None  # no read into a full pipe
    flow = flow.woken(readable=False, writable=True)
    assert step(flow, FAST, 10**9) == Write(200)
    flow = flow.wrote(50)  # even a part frees a slot, perhaps
    assert not flow.pipe_full and flow.room == 8192 - 150


def test_a_read_asks_for_the_grant_the_room_and_this_passes_share_whichever_is_least():
    bucket = Bucket.full(1_250_000, 0.0)  # 125000 tokens, quanta of 6250
    assert step(Flow(capacity=1 << 20), bucket, 10**9) == Read(125_000)
    assert step(Flow(capacity=1 << 20), bucket, 20_000) == Read(20_000)
    nearly_full = Flow(capacity=10_000).read(7000).write_blocked()  # room for 3000 more
    assert step(nearly_full, bucket.take(124_000), 10**9) is None  # 1000 tokens: wait for 3000
    assert step(nearly_full, bucket.take(122_000), 10**9) == Read(3000)
    assert step(Flow(capacity=1 << 20), bucket, 6000) is None  # its share is used up: next pass
    assert step(Flow(capacity=3000), bucket, 6000) == Read(3000)  # a small pipe reads less


def test_nonsense_from_a_system_call_is_refused_loudly():
    with pytest.raises(ValueError):
        Flow(capacity=100).wrote(1)  # more than the pipe holds
    with pytest.raises(ValueError):
        Flow(capacity=100).read(-1)
    with pytest.raises(ValueError):
        Bucket.full(100, 0.0).take(-1)


# --- wake-ups ------------------------------------------------------------------------------------


def test_an_idle_flow_asks_for_no_wake_up():
    drained = Flow(capacity=65536).read_blocked()
    empty = Bucket.full(125, 0.0).take(12)
    assert wakeup(0.0, [(empty, [drained]), (empty, [drained])], []) is None
    ended = Flow(capacity=65536).read(0).finished()
    assert wakeup(0.0, [(Bucket.full(0, 0.0), [ended])], []) is None


def test_a_flow_waiting_for_its_destination_asks_for_no_wake_up():
    waiting = Flow(capacity=8192).read(100).write_blocked().read_blocked()
    assert wakeup(0.0, [(Bucket.full(0, 0.0), [waiting])], []) is None


def test_a_throttled_flow_wakes_the_loop_when_its_quantum_is_due():
    bucket = Bucket.full(125, 0.0).take(12)
    wanting = Flow(capacity=65536)
    assert wakeup(0.0, [(bucket, [wanting])], []) == pytest.approx(12 / 125)
    assert wakeup(0.05, [(bucket, [wanting])], [0.07]) == pytest.approx(0.02)  # a deadline first
    assert wakeup(0.0, [(Bucket.full(125, 0.0), [wanting])], []) == 0.0  # tokens there: at once


def test_a_flow_with_something_to_do_now_wakes_the_loop_at_once():
    bucket = Bucket.full(125, 0.0).take(12)
    assert wakeup(0.0, [(bucket, [Flow(capacity=100).read(5).read_blocked()])], []) == 0.0
    assert wakeup(0.0, [(bucket, [Flow(capacity=100).read(0)])], []) == 0.0  # the FIN


def test_deadlines_alone_and_none_at_all():
    assert wakeup(1.0, [], [3.0, 2.5]) == 1.5
    assert wakeup(1.0, [], [0.5]) == 0.0
    assert wakeup(1.0, [], []) is None


# --- fairness ------------------------------------------------------------------------------------


def test_a_pass_starts_after_the_flow_that_read_last():
    turns = Turns()
    assert turns.order([1, 2, 3]) == [1, 2, 3]
    turns = turns.served(2)
    assert turns.order([1, 2, 3]) == [3, 1, 2]
    assert turns.order([1, 3, 4]) == [3, 4, 1]  # 2 is gone: whoever came after it
    assert turns.served(4).order([1, 3, 4]) == [1, 3, 4]
    assert turns.order([]) == []


def run_passes(flows: int, rate: int, times: list[float]) -> list[list[int]]:
    """Passes at `times` over `flows` flows that always have something to read; returns, per
    pass, the flows (indexes) that read."""
    bucket, turns = Bucket.full(rate, 0.0), Turns()
    passes = []
    for now in times:
        bucket = bucket.refill(now)
        budget = share(bucket, flows)
        readers = []
        for key in turns.order(list(range(flows))):
            action = step(Flow(capacity=1 << 20), bucket, budget)
            if isinstance(action, Read):
                bucket = bucket.take(action.size)
                turns = turns.served(key)
                readers.append(key)
        passes.append(readers)
    return passes


@settings(max_examples=200, deadline=None)
@given(
    flows=st.integers(1, 8),
    rate=st.sampled_from([125, 12_500, 1_250_000, 625_000_000]),
    gaps=st.lists(st.floats(0, 0.02), min_size=1, max_size=200),
)
def test_no_flow_starves_whatever_wakes_the_loop(flows, rate, gaps):
    """Passes come at quanta and at any event between them; among flows that all want to read,
    each reads at least once in every `flows` passes in which anyone read."""
    times, now = [], 0.0
    for gap in gaps:
        now += gap
        times.append(now)
    granting = [readers for readers in run_passes(flows, rate, times) if readers]
    for i in range(len(granting) - flows + 1):
        window = set().union(*granting[i : i + flows])
        assert window == set(range(flows)), f"passes {i}..{i + flows}: {granting[i : i + flows]}"


def test_each_flow_gets_an_equal_part_of_the_rate():
    rate, flows = 1_250_000, 3
    quantum = Bucket.full(rate, 0.0).quantum
    times = [i * quantum / rate for i in range(1, 301)]  # a pass at every quantum, for 1.5 s
    counts = [0] * flows
    for readers in run_passes(flows, rate, times):
        for key in readers:
            counts[key] += 1
    assert max(counts) - min(counts) <= 1


# --- a toy kernel: every byte, then the FIN, whatever the pipe --------------------------------


@dataclass
class Toy:
    """What a flow's system calls meet: the source's queue of segments (all sent, then a FIN,
    so no readable edge ever comes again), a pipe of `slots` slots (one per piece, as splice
    fills them) and a destination that takes `room` bytes until its reader drains it."""

    segments: deque[int]
    slots: int
    room: int
    free: int = 0
    pipe: deque[int] = field(default_factory=deque)
    delivered: int = 0
    fins: int = 0

    def read(self, n: int) -> int | None:  # None: EAGAIN
        if len(self.pipe) >= self.slots:
            return None  # splice waits for a free slot before it looks at the socket
        if not self.segments:
            return 0  # the FIN
        moved = 0
        while self.segments and len(self.pipe) < self.slots and moved < n:
            take = min(self.segments[0], n - moved)
            self.pipe.append(take)
            moved += take
            if take == self.segments[0]:
                self.segments.popleft()
            else:
                self.segments[0] -= take
        return moved

    def write(self, n: int) -> int | None:
        if not self.free:
            return None
        moved = 0
        while self.pipe and moved < min(n, self.free):
            take = min(self.pipe[0], n - moved, self.free - moved)
            moved += take
            if take == self.pipe[0]:
                self.pipe.popleft()
            else:
                self.pipe[0] -= take
        self.free -= moved
        self.delivered += moved
        return moved


def relay(toy: Toy, flow: Flow, rate: int, limit: int = 200_000) -> Flow:
    """Drive `flow` over `toy` as shaper.py does; the destination's reader drains it whenever the
    loop waits for an event. Returns the flow at the end, or when nothing can happen any more."""
    bucket, now = Bucket.full(rate, 0.0), 0.0
    toy.free = toy.room
    for _ in range(limit):
        bucket = bucket.refill(now)
        budget, read = share(bucket, 1), 0
        while (action := step(flow, bucket, budget - read)) is not None:
            if isinstance(action, Write):
                n = toy.write(action.size)
                flow = flow.write_blocked() if n is None else flow.wrote(n)
            elif isinstance(action, Read):
                n = toy.read(action.size)
                if n is None:
                    flow = flow.read_blocked()
                else:
                    flow = flow.read(n)
                    bucket, read = bucket.take(n), read + n
            else:
                assert not toy.pipe and not toy.segments  # the FIN, after every byte before it
                toy.fins += 1
                flow = flow.finished()
        if flow.shut:
            return flow
        timeout = wakeup(now, [(bucket, [flow])], [])
        if timeout is not None:
            now += timeout
        elif not flow.writable:  # waiting for the destination: its reader drains it
            toy.free = toy.room
            flow = flow.woken(readable=False, writable=True)
        else:
            return flow  # no event can come: stalled
    raise AssertionError("did not end")


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(st.integers(1, 300), min_size=1, max_size=400),
    slots=st.integers(2, 16),
    room=st.integers(1, 5000),
    rate=st.sampled_from([0, 20_000, 1_250_000]),
)
def test_every_byte_then_the_fin_through_any_pipe(segments, slots, room, rate):
    toy = Toy(deque(segments), slots, room)
    flow = relay(toy, Flow(capacity=slots * 4096), rate)
    assert flow.shut, f"stalled with {sum(toy.segments)} bytes in the socket, {sum(toy.pipe)} in the pipe"
    assert (toy.delivered, toy.fins, flow.moved) == (sum(segments), 1, sum(segments))


class OldFlow(Flow):
    """The rule the shaper had: any EAGAIN of a read means a drained socket."""

    def read_blocked(self) -> Flow:
        return _but(self, readable=False)


def test_the_toy_catches_the_old_rule():
    """Small segments, two slots, a destination that fills: the old rule waits for an edge that
    never comes, with data in the socket. The test above would have caught it."""
    toy = Toy(deque([100] * 50), slots=2, room=300)
    flow = relay(toy, OldFlow(capacity=8192), 0)
    assert not flow.shut and sum(toy.segments) > 0
    toy = Toy(deque([100] * 50), slots=2, room=300)
    assert relay(toy, Flow(capacity=8192), 0).shut


def test_quanta_keep_reads_few_at_a_low_rate():
    """At 100 kb/s (12500 bytes/s) reads come in pieces of a KiB or more, not of a wake-up's
    microseconds' worth."""
    toy = Toy(deque([50] * 2000), slots=256, room=1 << 20)
    reads: list[int] = []

    class Counting(Flow):
        def read(self, n: int) -> Flow:
            reads.append(n)
            return super().read(n)

    relay(toy, Counting(capacity=1 << 20), 12_500)
    assert toy.delivered == 100_000
    pieces = [n for n in reads[:-1] if n]  # the last are the rest and the FIN
    assert min(pieces[:-1]) >= QUANTUM_FLOOR


def test_every_transition_keeps_exactly_the_fields_of_its_class():
    """Transitions skip the constructors' checks (they run at every system call)."""
    flow = Flow(capacity=8192)
    bucket = Bucket.full(1000, 0.0)
    states = [
        flow.read(10),
        flow.read(0),
        flow.read_blocked(),
        flow.read(10).read_blocked(),
        flow.read(10).wrote(5),
        flow.write_blocked(),
        flow.read(0).finished(),
        flow.woken(readable=True, writable=True),
        bucket.refill(1.0),
        bucket.take(5),
        Bucket.full(0, 0.0).refill(1.0),
    ]
    for state in states:
        assert list(vars(state)) == list(type(state).fields), state


def test_states_are_values_that_never_change():
    """What the states kept of frozen dataclasses: equality by class and fields, a hash, a repr
    naming every field, and no change in place."""
    flow = Flow(capacity=8192)
    assert flow == Flow(8192) and flow != Flow(4096) and flow.read(1) != flow
    assert Read(5) == Read(5) and Read(5) != Write(5) and Finish() == Finish()
    assert len({Flow(8192), Flow(8192), Turns(), Turns(3)}) == 3
    assert repr(Bucket(1, 2, 3, 4.0, 5.0)) == "Bucket(rate=1, burst=2, quantum=3, tokens=4.0, stamp=5.0)"
    with pytest.raises(AttributeError, match="frozen"):
        flow.pending = 3  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del flow.pending
    assert flow.pending == 0


def test_the_shaper_starts_on_a_small_part_of_the_standard_library():
    """Every rate-limited request waits for its shaper to listen: dataclasses (with inspect),
    typing, argparse and json were 40 of its 80 ms to start, and are not loaded."""
    import subprocess
    import sys

    check = "import sys, scistream.s2ds.shaper\nprint(sorted(set(sys.modules) & NAMES))\n"
    names = {"dataclasses", "inspect", "typing", "argparse", "json", "re"}
    done = subprocess.run(
        [sys.executable, "-c", check.replace("NAMES", repr(names))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"
