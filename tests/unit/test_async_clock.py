"""The virtual clock against hand-computed schedules (docs/async.md)."""
import pytest

from pipeline.federation import clock
from pipeline.federation.clock import Aggregation, Arrival, Boundary, Dispatch


def _of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def test_three_clients_one_update_per_aggregation():
    # client c takes 1, 2, 4 time units; all three always in flight (the idle one is re-dispatched)
    events = clock.schedule([1.0, 2.0, 4.0], concurrency=3, total=6, per_round=3, buffer_size=1,
                            t_max=None, seed=0)
    arrivals = [(a.time, a.client, a.base_version) for a in _of(events, Arrival)]
    # t=2: client 1 (dispatched at t=0, lower dispatch number) before client 0's second update
    assert arrivals == [(1.0, 0, 0), (2.0, 1, 0), (2.0, 0, 1), (3.0, 0, 3), (4.0, 2, 0), (4.0, 1, 2)]
    staleness = [g.version - 1 - a.base_version for g, a in zip(_of(events, Aggregation), _of(events, Arrival))]
    assert staleness == [0, 1, 1, 0, 4, 3]
    dispatches = [(d.time, d.client, d.version) for d in _of(events, Dispatch)]
    assert sorted(dispatches[:3], key=lambda d: d[1]) == [(0.0, 0, 0), (0.0, 1, 0), (0.0, 2, 0)]
    assert dispatches[3:] == [(1.0, 0, 1), (2.0, 1, 2), (2.0, 0, 3)]
    assert [(b.round, b.time, b.version) for b in _of(events, Boundary)] == [(1, 2.0, 3), (2, 4.0, 6)]
    assert [a.uploads for a in _of(events, Arrival)] == [0, 0, 1, 2, 0, 1]


def test_buffer_and_timer():
    events = clock.schedule([1.0, 2.0, 4.0], concurrency=3, total=4, per_round=2, buffer_size=2,
                            t_max=1.5, seed=0)
    aggs = [(g.time, g.version, g.reason, [next(a.client for a in _of(events, Arrival) if a.seq == s)
                                           for s in g.members]) for g in _of(events, Aggregation)]
    # the timer fires at the last aggregation (0) + 1.5 with client 0's update buffered; two arrivals at t=2 fill the buffer; client 2's lone arrival at t=4 comes after the deadline
    assert aggs == [(1.5, 1, "timer", [0]), (2.0, 2, "buffer", [1, 0]), (4.0, 3, "timer", [2])]
    assert [(b.round, b.time, b.version) for b in _of(events, Boundary)] == [(1, 2.0, 1), (2, 4.0, 3)]


def test_the_last_arrivals_are_aggregated():
    events = clock.schedule([1.0, 1.0], concurrency=2, total=3, per_round=3, buffer_size=2, t_max=None, seed=0)
    assert [g.reason for g in _of(events, Aggregation)] == ["buffer", "end"]
    assert events[-1] == Boundary(1, 2.0, 2)


def test_schedule_is_a_function_of_the_seed():
    args = dict(concurrency=3, total=20, per_round=4, buffer_size=2, t_max=3.0, jitter=0.3)
    costs = [1.0, 1.0, 2.0, 2.0, 4.0, 8.0]
    a, b = clock.schedule(costs, seed=5, **args), clock.schedule(costs, seed=5, **args)
    assert a == b and a != clock.schedule(costs, seed=6, **args)
    times = [e.time for e in a]
    assert times == sorted(times)


def test_position_after_a_block():
    events = clock.schedule([1.0, 2.0, 4.0], concurrency=3, total=6, per_round=3, buffer_size=2,
                            t_max=None, seed=0)
    at = clock.position(events, 1)
    assert isinstance(events[at.next_event - 1], Boundary) and events[at.next_event - 1].round == 1
    assert at.time == 2.0 and len(at.in_flight) == 3  # every client re-dispatched
    # replaying the events up to the boundary gives the same buffer
    buffered = []
    for e in events[:at.next_event]:
        if isinstance(e, Arrival):
            buffered.append(e.seq)
        elif isinstance(e, Aggregation):
            buffered = []
    assert [a.seq for a in at.buffered] == buffered
    with pytest.raises(ValueError):
        clock.position(events, 9)


def test_jitter_stays_within_its_band():
    for seq in range(50):
        assert 0.8 <= clock.durations_factor(3, seq, 0.2) <= 1.2
    assert clock.durations_factor(3, 0, 0.0) == 1.0
