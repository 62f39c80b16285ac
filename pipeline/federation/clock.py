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
from typing import Sequence

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
             buffer_size: int, t_max: float | None, seed: int, jitter: float = 0.0,
             order: Sequence[int] | None = None) -> list[Event]:
    """The run's events in order. `client_cost[c]`: client c's virtual duration (before jitter);
    `total` updates are trained in all, `concurrency` at once; the server aggregates when
    `buffer_size` updates are buffered or `t_max` has passed since its last aggregation (with
    one buffered), and once more after the last arrival. `order`: the arrival order of the
    dispatches (seqs) as a wall-clock run recorded it, replacing the virtual finishing times."""
    n = len(client_cost)
    events: list[Event] = []
    heap: list[tuple[float, int, int, int]] = []  # (finish time or replay rank, seq, client, version)
    busy: set[int] = set()
    rank = {s: i for i, s in enumerate(order)} if order is not None else None
    state = {"t": 0.0, "version": 0, "dispatched": 0, "last": 0.0}
    buffer: list[int] = []
    uploads = [0] * n
    arrived = 0

    def dispatch() -> None:
        seq = state["dispatched"]
        idle = [c for c in range(n) if c not in busy]
        client = idle[int(np.random.default_rng(derive_seed(seed, DISPATCH, seq)).integers(len(idle)))]
        busy.add(client)
        finish = state["t"] + client_cost[client] * durations_factor(seed, seq, jitter)
        key = float(rank[seq]) if rank is not None else finish
        heapq.heappush(heap, (key, seq, client, state["version"]))
        events.append(Dispatch(seq, client, state["t"], state["version"]))
        state["dispatched"] += 1

    def aggregate(reason: str) -> None:
        state["version"] += 1
        state["last"] = state["t"]
        events.append(Aggregation(state["t"], state["version"], tuple(buffer), reason))
        buffer.clear()

    for _ in range(min(concurrency, total)):
        dispatch()
    while heap:
        key, seq, client, version = heap[0]
        finish = key if rank is None else max(state["t"], _finish_time(events, seq, client_cost, seed, jitter))
        if t_max is not None and buffer and state["last"] + t_max < finish:
            state["t"] = state["last"] + t_max  # the timer fires before the next arrival
            aggregate("timer")
            continue
        heapq.heappop(heap)
        state["t"] = finish
        busy.discard(client)
        arrived += 1
        events.append(Arrival(seq, client, finish, version, uploads[client], arrived))
        uploads[client] += 1
        buffer.append(seq)
        if len(buffer) >= buffer_size or (t_max is not None and state["t"] - state["last"] >= t_max):
            aggregate("buffer" if len(buffer) >= buffer_size else "timer")
        if state["dispatched"] < total:
            dispatch()
        if arrived == total and buffer:
            aggregate("end")
        if arrived % per_round == 0 or arrived == total:
            events.append(Boundary(-(-arrived // per_round), state["t"], state["version"]))
    return events


def _finish_time(events, seq, client_cost, seed, jitter) -> float:
    """A replayed dispatch's virtual finishing time (its order is given; its time still counts)."""
    d = next(e for e in events if isinstance(e, Dispatch) and e.seq == seq)
    return d.time + client_cost[d.client] * durations_factor(seed, seq, jitter)


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
