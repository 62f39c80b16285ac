"""The asynchronous run's schedule on a virtual clock: who trains from which version, when each
update arrives, when the server aggregates (docs/async.md).

A client's duration is `local_steps * step_cost(tier) / speed(tier)`, times a seeded jitter
factor: the step cost is the tier's training FLOPs per token relative to the costliest tier's
(a low-top-k tier is faster per step), the speed its hardware (`tiers[].speed`). Durations do
not depend on what the clients learn, so the whole schedule is a function of the config and
the seed: it is computed before training, every rank computes the same one, and a resumed run
finds its place in it.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.federation.sampling import derive_seed

DISPATCH, JITTER = 11, 12  # seed streams, apart from sampling.py's


@dataclass(frozen=True)
class Dispatch:
    seq: int  # the dispatch's number: seeds the client's local data draw
    client: int
    time: float
    version: int  # the global version the client trains from


@dataclass(frozen=True)
class Arrival:
    seq: int
    client: int
    time: float
    base_version: int
    uploads: int  # the client's earlier arrivals (AlignFed's n_i)
    index: int  # 1-based count of arrivals so far


@dataclass(frozen=True)
class Aggregation:
    time: float
    version: int  # the version it makes (the previous one + 1)
    members: tuple[int, ...]  # seqs of the buffered updates, in arrival order
    reason: str  # buffer (K arrivals) | timer (T_max) | end (the last arrivals)


@dataclass(frozen=True)
class Boundary:
    """The end of a block of `clients_per_round` arrivals (one sync round's client work): where
    the run evaluates and checkpoints."""

    round: int
    time: float
    version: int


Event = Dispatch | Arrival | Aggregation | Boundary


def durations_factor(seed: int, seq: int, jitter: float) -> float:
    if jitter == 0:
        return 1.0
    u = np.random.default_rng(derive_seed(seed, JITTER, seq)).uniform(-1.0, 1.0)
    return 1.0 + jitter * float(u)


def schedule(client_cost: Sequence[float], concurrency: int, total: int, per_round: int,
             buffer_size: int, t_max: float | None, seed: int, jitter: float = 0.0) -> list[Event]:
    """The run's events in order on the virtual clock. `client_cost[c]`: client c's duration
    before jitter; the rest as `run_events`."""
    return list(run_events(lambda seq, client: client_cost[client] * durations_factor(seed, seq, jitter),
                           len(client_cost), concurrency, total, per_round, buffer_size, t_max, seed))


def run_events(duration: Callable[[int, int], float], clients: int, concurrency: int, total: int,
               per_round: int, buffer_size: int, t_max: float | None, seed: int) -> Iterator[Event]:
    """The run's events in order, lazily: `duration(seq, client)` is asked after the Dispatch is
    yielded (and, at the start, after all `concurrency` first Dispatches are), so that a wall
    clock can train the client and answer with the seconds it took. `total` updates are trained
    in all, `concurrency` at once; the server aggregates when `buffer_size` updates are buffered
    or `t_max` has passed since its last aggregation (with one buffered), and once more after the
    last arrival. Ties in arrival time go to the earlier dispatch."""
    heap: list[tuple[float, int, int, int]] = []  # (finish time, seq, client, base version)
    busy: set[int] = set()
    state = {"t": 0.0, "version": 0, "dispatched": 0, "last": 0.0}
    buffer: list[int] = []
    uploads: dict[int, int] = {}
    arrived = 0

    def dispatch() -> Dispatch:
        seq = state["dispatched"]
        idle = [c for c in range(clients) if c not in busy]
        client = idle[int(np.random.default_rng(derive_seed(seed, DISPATCH, seq)).integers(len(idle)))]
        busy.add(client)
        state["dispatched"] += 1
        return Dispatch(seq, client, state["t"], state["version"])

    def start(d: Dispatch) -> None:
        heapq.heappush(heap, (d.time + duration(d.seq, d.client), d.seq, d.client, d.version))

    def aggregate(reason: str) -> Aggregation:
        state["version"] += 1
        state["last"] = state["t"]
        event = Aggregation(state["t"], state["version"], tuple(buffer), reason)
        buffer.clear()
        return event

    first = []
    for _ in range(min(concurrency, total)):
        first.append(dispatch())
        yield first[-1]
    for d in first:
        start(d)
    while heap:
        finish, seq, client, version = heap[0]
        if t_max is not None and buffer and state["last"] + t_max < finish:
            state["t"] = state["last"] + t_max  # the timer fires before the next arrival
            yield aggregate("timer")
            continue
        heapq.heappop(heap)
        state["t"] = finish
        busy.discard(client)
        arrived += 1
        yield Arrival(seq, client, finish, version, uploads.get(client, 0), arrived)
        uploads[client] = uploads.get(client, 0) + 1
        buffer.append(seq)
        if len(buffer) >= buffer_size or (t_max is not None and state["t"] - state["last"] >= t_max):
            yield aggregate("buffer" if len(buffer) >= buffer_size else "timer")
        if state["dispatched"] < total:
            d = dispatch()
            yield d
            start(d)
        if arrived == total and buffer:
            yield aggregate("end")
        if arrived % per_round == 0 or arrived == total:
            yield Boundary(-(-arrived // per_round), state["t"], state["version"])


@dataclass
class Position:
    """Where a run stands after a block: its in-flight dispatches and its buffered arrivals."""

    next_event: int  # index of the first event after the boundary
    in_flight: list[Dispatch]
    buffered: list[Arrival]
    time: float
    version: int


def position(events: Sequence[Event], round_: int) -> Position:
    """The state right after block `round_` (0: the start, before any event)."""
    flying: dict[int, Dispatch] = {}
    buffered: list[Arrival] = []
    if round_ == 0:
        return Position(0, [], [], 0.0, 0)
    for i, event in enumerate(events):
        if isinstance(event, Dispatch):
            flying[event.seq] = event
        elif isinstance(event, Arrival):
            flying.pop(event.seq)
            buffered.append(event)
        elif isinstance(event, Aggregation):
            buffered = []
        elif event.round == round_:
            return Position(i + 1, list(flying.values()), buffered, event.time, event.version)
    raise ValueError(f"the schedule has no block {round_}")


def tier_step_costs(mcfg, tiers, lora_rank: int, seq_len: int, expert_lora: bool, attention_lora: bool) -> list[float]:
    """Each tier's training FLOPs per token relative to the costliest tier's."""
    from pipeline.model import flops_per_token

    flops = [flops_per_token(mcfg, top_k=t.top_k, lora_rank=lora_rank, seq_len=seq_len,
                             expert_lora=expert_lora, attention_lora=attention_lora)["train"] for t in tiers]
    top = max(flops)
    return [f / top for f in flops]
