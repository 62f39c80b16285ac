"""Which client group trains which sampled client each round (`federation.placement`).

`tier`: a tier's clients go round-robin to that tier's groups (Layout.assign), as when tiers
mean hardware. `balanced`: each round's clients go to the groups so that the round's makespan
(its busiest group's time) is smallest, by a cost model. A client's result does not depend on
where it trains: its tier fixes its top-k, rank, data and seeds, and a group applies them
whatever its own tier; only the data-parallel layout of the group reassociates float sums
(docs/placement.md). So placement is a pure performance decision.

Cost model. A client's work is `local_steps * batch_size * max_length` tokens times the training
FLOPs per token at its tier's top-k and LoRA rank (model/flops.py). A group's seconds per FLOP
are planned as 1 / (its GPUs * NOMINAL_TFLOPS) and corrected after every round by the measured
seconds of the clients it trained, per tier, smoothed (CostModel). Placement reads only this
state, which every rank computes alike from the round's gathered client seconds and which the
checkpoint holds, so resume places as the uninterrupted run did at that round; wall-clock time
within a round never changes a placement.

A client lands only on a group whose GPUs fit its tier's memory plan (plan/memory.py at the
client's top-k, the group's ranks, ep and `gpu_memory_gb`).

`queue`: the groups pull the round's clients, costliest first, as they free up
(federation/client_queue.py); the balanced plan is its prediction, the groups that trained
the clients its record. It needs every tier to fit every group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from pipeline.config import Config, Tier
from pipeline.errors import ConfigError
from pipeline.federation.topology import Layout

PLACEMENTS = ("tier", "balanced")  # planned before the round; `queue` is predicted as balanced
# Planned throughput of one GPU before any round is measured: the achieved bf16 rate of one
# H200 on an OLMoE-1B-7B step at top-k 8, batch 16 x 1024 (bench/results-h200-olmoe_scale.txt:
# 16384 tokens * 4.97 GFLOP / 0.489 s). Only predicted seconds depend on it, never utilisation
# or a placement's ratios; the first measured round replaces it.
NOMINAL_TFLOPS = 166.0
SMOOTHING = 0.5  # weight of the newest round in a group's learned correction


# ---------------------------------------------------------------------------------------------
# The scheduler: pure functions on costs


def lpt_times(times: Sequence[Sequence[float]], allowed: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Longest processing time first: `times[j][g]` is job j's seconds on group g. Jobs by
    decreasing shortest time over their allowed groups (ties: lower index first), each to the
    allowed group where it would finish first (ties: lower group). Returns each job's group."""
    m = len(times[0]) if times else 0
    load = [0.0] * m
    out = [-1] * len(times)
    options = [list(allowed[j]) if allowed is not None else list(range(m)) for j in range(len(times))]
    for job in sorted(range(len(times)), key=lambda j: (-min(times[j][g] for g in options[j]), j)):
        best = min(options[job], key=lambda g: (load[g] + times[job][g], g))
        load[best] += times[job][best]
        out[job] = best
    return out


def lpt(costs: Sequence[float], seconds_per_cost: Sequence[float],
        allowed: Sequence[Sequence[int]] | None = None) -> list[int]:
    """LPT on groups of different speeds (`seconds_per_cost[g]`). Without restrictions within
    2m/(m+1) of the optimal makespan (Gonzalez, Ibarra, Sahni 1977), 4/3 - 1/(3m) on equal groups
    (Graham 1969)."""
    return lpt_times([[c * s for s in seconds_per_cost] for c in costs], allowed)


def busy_seconds(groups_of: Sequence[int], costs: Sequence[float], seconds_per_cost: Sequence[float]) -> list[float]:
    """Each group's predicted busy seconds when job j runs on group groups_of[j]."""
    busy = [0.0] * len(seconds_per_cost)
    for job, g in enumerate(groups_of):
        busy[g] += costs[job] * seconds_per_cost[g]
    return busy


def busy_from_times(groups_of: Sequence[int], times: Sequence[Sequence[float]], groups: int) -> list[float]:
    busy = [0.0] * groups
    for job, g in enumerate(groups_of):
        busy[g] += times[job][g]
    return busy


def utilisation(busy: Sequence[float], gpus: Sequence[int], wall: float | None = None) -> float | None:
    """Busy GPU-seconds over GPUs x the round's wall time (default: its busiest group's time)."""
    wall = max(busy, default=0.0) if wall is None else wall
    if wall <= 0:
        return None
    return sum(b * n for b, n in zip(busy, gpus)) / (sum(gpus) * wall)


# ---------------------------------------------------------------------------------------------
# Costs and memory fits from the config and the model's shape


def tier_settings(cfg: Config, shape, tiers: list[Tier]) -> list[tuple[int, int]]:
    """(top-k, LoRA rank) each tier's clients train at, as the method plans them (the sparse
    methods train every tier at the full rank, the low-rank ones at full top-k)."""
    from pipeline.algorithms import ModelInfo, build_strategy

    info = ModelInfo(shape.layers, shape.experts, shape.k_max, cfg.model.lora.rank, cfg.model.lora.alpha)
    strategy = build_strategy(cfg.algorithm.name, cfg.algorithm.options, info, tiers)
    try:
        strategy.init_state({})  # plans carry the adapters; top-k and rank do not depend on them
        plans = [strategy.plan(0, 1, tier) for tier in tiers]
        return [(p.top_k, p.lora_rank) for p in plans]
    except (KeyError, ValueError, RuntimeError, IndexError, AttributeError):
        return [(shape.k_max, cfg.model.lora.rank) for _ in tiers]


def tier_costs(cfg: Config, shape, settings: list[tuple[int, int]]) -> list[float]:
    """Training FLOPs of one client's local work, per tier."""
    from pipeline.model.flops import flops_per_token

    config = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
              "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
              "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
              "num_experts": shape.experts, "num_experts_per_tok": shape.k_max, "vocab_size": shape.vocab}
    tr, lora = cfg.train, cfg.model.lora
    tokens = tr.local_steps * tr.batch_size * tr.max_length
    return [tokens * flops_per_token(config, top_k=k, lora_rank=r, seq_len=tr.max_length,
                                     expert_lora=lora.experts, attention_lora=lora.attention)["train"]
            for k, r in settings]


def memory_matrix(cfg: Config, shape, layout: Layout, top_ks: Sequence[int]) -> list:
    """[tier][group]: the memory plan (plan/memory.py TierMemory) of a client of the tier on the
    group's GPUs: at the tier's top-k, in the group's ranks, ep and gpu_memory_gb. The
    one-process group (tier None) trains every tier on one device: each at its own tier's row."""
    from pipeline.plan.memory import tier_memory

    index = {t.name: i for i, t in enumerate(cfg.tiers)}
    return [[tier_memory(shape, cfg, t if g.tier is None else index[g.tier], k, g.size) for g in layout.groups]
            for t, k in enumerate(top_ks)]


def fit_matrix(cfg: Config, shape, layout: Layout, top_ks: Sequence[int]) -> list[list[bool]]:
    """[tier][group]: whether a client of the tier fits the group's GPUs (memory_matrix; with
    activation checkpointing where train.activation_checkpointing allows it). The one-process
    group fits all."""
    return fits_of(memory_matrix(cfg, shape, layout, top_ks), layout)


def fits_of(rows: list, layout: Layout) -> list[list[bool]]:
    return [[g.tier is None or row[i].fits for i, g in enumerate(layout.groups)] for row in rows]


# ---------------------------------------------------------------------------------------------
# The learned cost model


class CostModel:
    """Seconds of a client of tier t on group g: its FLOPs times the group's planned seconds per
    FLOP times a learned ratio. A (tier, group) pair that trained keeps its own measured ratio,
    smoothed over rounds; any other pair takes `group factor * tier factor` fitted to the
    measured pairs, so one measured tier tells how fast a group is for the others, and one
    measured group how costly a tier really is (at small scale a step's fixed costs flatten the
    FLOP ratio between top-ks). Unmeasured: ratio 1, the plan. Plain float arithmetic only (no
    libm, no BLAS), so every rank computes the same bits."""

    FIT_ITERATIONS = 50

    def __init__(self, layout: Layout, costs: Sequence[float], nominal_tflops: float = NOMINAL_TFLOPS):
        self.signature = [[g.size, g.ep, g.tier] for g in layout.groups]
        self.planned = [1.0 / (g.size * nominal_tflops * 1e12) for g in layout.groups]
        self.costs = list(costs)  # FLOPs of a client's local work, per tier
        self.ratios: list[list[float | None]] = [[None] * len(layout.groups) for _ in self.costs]

    def _factors(self) -> tuple[list[float], list[float]]:
        """Group and tier factors with ratio ~ group * tier over the measured pairs, by
        alternating means; tier factors average 1 over the measured tiers."""
        cells = [(t, g, r) for t, row in enumerate(self.ratios) for g, r in enumerate(row) if r is not None]
        groups, tiers = len(self.planned), len(self.costs)
        tier = [1.0] * tiers
        group: list[float | None] = [None] * groups
        if not cells:
            return [1.0] * groups, tier
        for _ in range(self.FIT_ITERATIONS):
            for g in range(groups):
                values = [r / tier[t] for t, gg, r in cells if gg == g]
                group[g] = sum(values) / len(values) if values else None
            measured = sorted({t for t, _, _ in cells})
            for t in measured:
                values = [r / group[g] for tt, g, r in cells if tt == t]
                tier[t] = sum(values) / len(values)
            scale = sum(tier[t] for t in measured) / len(measured)
            for t in measured:
                tier[t] /= scale
            group = [None if f is None else f * scale for f in group]
        known = [f for f in group if f is not None]
        default = sum(known) / len(known)
        return [default if f is None else f for f in group], tier

    def seconds(self) -> list[list[float]]:
        """[tier][group]: predicted seconds of one client."""
        group, tier = self._factors()
        return [[self.costs[t] * self.planned[g] * (r if r is not None else group[g] * tier[t])
                 for g, r in enumerate(row)] for t, row in enumerate(self.ratios)]

    def observe(self, cells: dict[tuple[int, int], float], counts: dict[tuple[int, int], int]) -> None:
        """A round's measured seconds per (tier, group), summed over its `counts` clients."""
        for (t, g), seconds in sorted(cells.items()):
            if seconds <= 0:
                continue
            seen = seconds / (counts[t, g] * self.costs[t] * self.planned[g])
            old = self.ratios[t][g]
            self.ratios[t][g] = seen if old is None else (1 - SMOOTHING) * old + SMOOTHING * seen

    def state_dict(self) -> dict:
        return {"groups": self.signature, "ratios": [list(row) for row in self.ratios]}

    def load_state_dict(self, state: dict | None) -> None:
        """The checkpoint's ratios; a checkpoint of another layout (resumed on other ranks) or
        none starts from the plan."""
        if not state or state.get("groups") != self.signature:
            return
        ratios = state.get("ratios")
        if isinstance(ratios, list) and len(ratios) == len(self.costs):
            self.ratios = [[None if r is None else float(r) for r in row] for row in ratios]


# ---------------------------------------------------------------------------------------------
# The run's placement


@dataclass
class Round:
    """The current round's placement: clients per group and their predicted busy seconds."""

    groups: list[list[int]]
    predicted: list[float]


class Placement:
    """Places each round's clients (identically on every rank) and learns from measured rounds."""

    def __init__(self, mode: str, layout: Layout, tier_names: Sequence[str], client_tiers: Sequence[int],
                 costs: Sequence[float], fits: Sequence[Sequence[bool]], nominal_tflops: float = NOMINAL_TFLOPS,
                 checkpointed: Sequence[Sequence[bool]] | None = None):
        self.mode, self.layout = mode, layout
        self.tier_names = list(tier_names)  # per tier index
        self.client_tiers = list(client_tiers)  # tier index per client
        self.costs = list(costs)  # per tier
        self.fits = [list(row) for row in fits]  # [tier][group]
        # [tier][group]: the memory plan checkpoints activations there (TierMemory.checkpointed)
        self.checkpointed = [list(row) for row in checkpointed] if checkpointed else [[False] * len(r) for r in fits]
        self.model = CostModel(layout, costs, nominal_tflops)
        self.gpus = [g.size for g in layout.groups]
        self.current: Round | None = None
        self.last_utilisation: float | None = None

    @classmethod
    def for_run(cls, cfg: Config, layout: Layout, model_config: dict, tiers: list[Tier],
                client_tiers: Sequence[Tier]) -> "Placement":
        from pipeline.plan.memory import ModelShape

        shape = ModelShape.from_config(model_config)
        settings = tier_settings(cfg, shape, tiers)
        rows = memory_matrix(cfg, shape, layout, [k for k, _ in settings])
        fits = fits_of(rows, layout)
        if cfg.federation.placement == "queue":
            for tier, row in zip(tiers, fits):
                if not all(row):
                    g = row.index(False)
                    raise ConfigError(f"federation.placement=queue: tier {tier.name!r} does not fit the memory "
                                      f"of group {g} (tier {layout.groups[g].tier!r}); use balanced, which "
                                      "places each client only where it fits")
        return cls(cfg.federation.placement, layout, [t.name for t in tiers], [t.index for t in client_tiers],
                   tier_costs(cfg, shape, settings), fits,
                   checkpointed=[[m.checkpointed for m in row] for row in rows])

    def checkpointing(self, tier: int, group: int, device_type: str, mode: str) -> bool:
        """Whether a client of `tier` trains on `group` with activation checkpointing: always
        under `on`; under `auto` where its memory plan does not fit without it, on a GPU only
        (the plan models GPU memory; a CPU run keeps its speed). The plan's rows already say
        `on` or `auto`-and-too-big; only the device is decided here."""
        return self.checkpointed[tier][group] and (mode == "on" or device_type == "cuda")

    def allowed(self, tier: int) -> list[int]:
        """Groups a client of `tier` may train on: those its memory plan fits; if none does, its
        own tier's groups (where `tier` placement puts it), else every group."""
        groups = range(len(self.layout.groups))
        fits = [g for g in groups if self.fits[tier][g]]
        if fits:
            return fits
        name = self.tier_names[tier]
        return [g for g in groups if self.layout.groups[g].tier == name] or list(groups)

    def assign(self, clients: Sequence[int]) -> list[list[int]]:
        """Per group, the clients it trains this round (each exactly once, sorted)."""
        clients = list(clients)
        per_tier = self.model.seconds()
        times = [per_tier[self.client_tiers[c]] for c in clients]
        names = [self.tier_names[t] for t in self.client_tiers]
        group_of = {c: g for g, members in enumerate(self.layout.assign(clients, names)) for c in members}
        chosen = [group_of[c] for c in clients]
        n = len(self.layout.groups)
        if self.mode in ("balanced", "queue") and n > 1:
            balanced = lpt_times(times, [self.allowed(self.client_tiers[c]) for c in clients])
            # LPT is a heuristic: keep the tier placement when it is predicted no slower.
            if max(busy_from_times(balanced, times, n)) < max(busy_from_times(chosen, times, n)):
                chosen = balanced
        groups: list[list[int]] = [[] for _ in self.layout.groups]
        for c, g in zip(clients, chosen):
            groups[g].append(c)
        self.current = Round([sorted(g) for g in groups], busy_from_times(chosen, times, n))
        return self.current.groups

    def queue_order(self, clients: Sequence[int]) -> list[int]:
        """The round's clients as `queue` hands them out: costliest tier first, then by id."""
        return sorted(clients, key=lambda c: (-self.costs[self.client_tiers[c]], c))

    def observe(self, seconds: dict[int, float], wall: float, trained_on: dict[int, int] | None = None) -> dict:
        """After the round: each accepted client's measured training seconds (identical on every
        rank, gathered with the round) update the model; returns the round event's `placement`.
        `trained_on` (client -> group) replaces the planned groups where the queue decided."""
        current = self.current
        if trained_on is not None:
            groups = [[] for _ in current.groups]
            for c in sorted(trained_on):
                groups[trained_on[c]].append(c)
            current = self.current = Round(groups, current.predicted)
        busy = [sum(seconds.get(c, 0.0) for c in members) for members in current.groups]
        cells: dict[tuple[int, int], float] = {}
        counts: dict[tuple[int, int], int] = {}
        for g, members in enumerate(current.groups):
            for c in members:
                if c in seconds:
                    key = (self.client_tiers[c], g)
                    cells[key] = cells.get(key, 0.0) + seconds[c]
                    counts[key] = counts.get(key, 0) + 1
        self.model.observe(cells, counts)
        # `wall` is world rank 0's round; the other groups may have started it while rank 0
        # still evaluated the last one, so a group's busy time can exceed it.
        self.last_utilisation = utilisation(busy, self.gpus, max(wall, *busy))
        return {"mode": self.mode, "groups": current.groups, "gpus": self.gpus,
                "busy_seconds": busy, "predicted_seconds": current.predicted,
                "utilisation": self.last_utilisation,
                "predicted_utilisation": utilisation(current.predicted, self.gpus)}

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The run's two calls (rounds.run_round), and the checkpoint's


def my_clients(fed, clients: Sequence[int], round_: int = 0) -> Iterable[int]:
    """This group's share of the round's clients (all of them in one process); under `queue`
    with several groups, drawn one at a time as the group frees up."""
    placement = getattr(fed, "placement", None)
    if placement is None:
        names = [t.name for t in fed.client_tiers]
        return list(clients) if fed.topology is None else fed.topology.my_clients(clients, names)
    groups = placement.assign(clients)
    if getattr(fed, "queue", None) is not None:
        return fed.queue.pull(round_, placement.queue_order(clients))
    return list(clients) if fed.topology is None else groups[fed.topology.group.index]


def observe(fed, updates, wall: float) -> dict | None:
    """The round event's `placement` field from the world's accepted updates; learns."""
    placement = getattr(fed, "placement", None)
    if placement is None or placement.current is None:
        return None
    trained_on = {u.client_id: int(u.metrics["group"]) for u in updates} if getattr(fed, "queue", None) else None
    return placement.observe({u.client_id: float(u.metrics["seconds"]) for u in updates}, wall, trained_on)
