"""The Strategy API: what a federated method computes, apart from how it is run.

A strategy sees adapters (flat `dict[str, Tensor]`), tier settings and counts; never MPI,
torch.distributed or DeepSpeed. Aggregation is map-reduce: `contribution(update)` maps one
client update to tensors that are summed over clients (by the round loop, or by one collective
across client groups), then `finalize(sums)` makes the new global state and returns the
method's own metrics of it, which the round's record in metrics.jsonl carries.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from pipeline.config import Tier
from pipeline.engine.parallel_dims import GroupSums
from pipeline.errors import ConfigError
from pipeline.algorithms.options import Option, check_options
from pipeline.model.adapters import is_expert_adapter
from pipeline.model.setting import ModelSetting


@dataclass(frozen=True)
class ModelInfo:
    """What a strategy may know about the model."""

    num_layers: int
    num_experts: int
    k_max: int
    lora_rank: int  # r_max
    lora_alpha: float


@dataclass
class ClientPlan:
    """What the server sends one client for one round."""

    client_id: int
    round: int
    tier: Tier
    top_k: int  # experts per token this client computes
    lora_rank: int  # active LoRA rank
    adapters: dict[str, Tensor]  # the start point of local training


@dataclass
class ClientUpdate:
    """What one client returns after local training."""

    client_id: int
    round: int
    tier: Tier
    top_k: int
    lora_rank: int
    adapters: dict[str, Tensor]
    n_samples: int
    expert_token_counts: Tensor  # [num_layers, num_experts] routed tokens during local training
    tokens: int  # tokens seen during local training (per layer)
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # client_extras (e.g. a balancing bias)


class Strategy(ABC):
    """A federated method: subclasses implement `contribution` and `finalize` at least."""

    name = "base"
    option_spec: dict[str, Option] = {}  # algorithm.options: types, ranges, defaults (options.py)
    # Sums over the ranks that train a client together, for gradient hooks that need the whole
    # batch; the run hands over its engine's (ClientEngine.group_sums). Default: one rank.
    group_sums = GroupSums()
    # True when contribution and finalize treat every expert's rows of the expert-LoRA tensors
    # on their own: under expert parallelism a rank then holds, aggregates and checkpoints only
    # its experts' rows (`shard_experts`). False: whole tensors are gathered for the method.
    expert_sharded = False

    def __init__(self, options: dict, model: ModelInfo, tiers: list[Tier]):
        self.options = check_options(self.name, options, self.option_spec)
        self.model = model
        self.tiers = tiers
        self.global_adapters: dict[str, Tensor] = {}
        self.expert_range: tuple[int, int] | None = None  # None: every expert
        self.total_rounds = 0  # the run's federation.rounds (set by assembly.setup): for schedules

    def shard_experts(self, start: int, stop: int) -> None:
        """Keep only experts [start, stop) of the expert-LoRA tensors (expert_sharded methods)."""
        if not self.expert_sharded:
            raise TypeError(f"{self.name} aggregates whole expert tensors; it cannot be sharded")
        self.expert_range = (start, stop)
        self.global_adapters = {k: v[start:stop].clone() if is_expert_adapter(k) else v
                                for k, v in self.global_adapters.items()}

    def expert_rows(self, per_expert: Tensor) -> Tensor:
        """This strategy's experts of a `[..., E]` per-expert statistic (all of them unsharded)."""
        return per_expert if self.expert_range is None else per_expert[..., slice(*self.expert_range)]

    # --- server state -------------------------------------------------------------------
    def init_state(self, initial_adapters: dict[str, Tensor]) -> None:
        self.global_adapters = {k: v.detach().clone() for k, v in initial_adapters.items()}

    # Attributes holding further dicts of server tensors (e.g. a base delta), each saved under
    # "<name>/" in the checkpoint after the adapters, in this order.
    tensor_state: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        """{"tensors": flat dict for safetensors, "meta": JSON-able}; no pickled code."""
        tensors = {f"adapters/{k}": v for k, v in self.global_adapters.items()}
        for name in self.tensor_state:
            tensors.update({f"{name}/{k}": v for k, v in getattr(self, name).items()})
        return {"tensors": tensors, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_adapters = _prefixed(state, "adapters")
        for name in self.tensor_state:
            setattr(self, name, _prefixed(state, name))

    # --- per client ---------------------------------------------------------------------
    def plan(self, client_id: int, round_: int, tier: Tier) -> ClientPlan:
        """What client `client_id` of `tier` trains from in round `round_`: the tier's own top-k."""
        return ClientPlan(client_id, round_, tier, top_k=tier.top_k, lora_rank=self.model.lora_rank,
                          adapters=self.global_adapters)

    # Model features the method needs, applied when the model is patched:
    # routing_modulation -> a learnable DMR vector `phi` per MoE layer (part of the adapters);
    # record_routing -> each block keeps its last routing (indices, probs) for gradient hooks.
    model_features: dict[str, Any] = {}

    def setting(self, top_k: int, lora_rank: int) -> ModelSetting:
        """The model setting at (top_k, lora_rank), for a client's training, an evaluation or the
        export: the method's LoRA scale and routing options with it."""
        return ModelSetting(top_k, lora_rank)

    def configure_model(self, model: torch.nn.Module, plan: ClientPlan | None) -> None:
        """Install the method's hooks before a client trains (plan) or before evaluation (None)."""

    def client_extras(self, model: torch.nn.Module, plan: ClientPlan) -> dict[str, Tensor]:
        """What a client returns besides its adapters (e.g. a balancing bias), after training."""
        return {}

    def extra_loss(self, model: torch.nn.Module, plan: ClientPlan) -> Tensor | None:
        """Added to the task loss on every local step (e.g. a range penalty)."""
        return None

    def after_backward(self, model: torch.nn.Module, plan: ClientPlan) -> None:
        """Called after backward, before the optimizer step, for state updates from the step
        (e.g. a balancing bias). Under ZeRO 1/2 `p.grad` is already gone here: gradient edits
        belong in tensor hooks set up by `configure_model`."""

    # --- model access: methods that work on the base weights (merge-into-backbone) ----------
    # `ops` (pipeline/federation/model_ops.py) is the strategy's only handle on the model:
    # `base_weights()` yields (LoRA pair key, pristine base weight), this rank's expert rows;
    # `set_base(deltas, low_rank)` sets the base to pristine + deltas + low-rank shifts; a
    # client's ops add `calibration_batches(n, batch_size)` and `weight_gradients(setting,
    # batches)` (the full-weight gradient of the client's loss, pipeline/engine/calibration.py).
    def check_run(self, base_shapes: dict[str, tuple[int, ...]], group_ranks: int) -> None:
        """ConfigError if the method cannot run on this model (its adapted base weights' shapes,
        by LoRA pair key) with client groups of up to `group_ranks` ranks; before anything is written."""

    def attach_storage(self, storage) -> None:
        """Where the method may keep files (client_store.RunStorage), once per training run."""

    def prepare_round(self, ops, round_: int) -> None:
        """Every rank, before the round's clients train."""

    def prepare_client(self, plan: ClientPlan, ops) -> ClientPlan:
        """Before `plan`'s client trains: the plan it trains from (default: `plan` itself). A
        method that shifts the base for this client sets it here; the next client's
        `prepare_client`, the round's start and every evaluation set the base again."""
        return plan

    def stage_files(self, directory) -> None:
        """Add the method's files to the checkpoint being written in `directory` (world rank 0)."""

    def restore_files(self, directory) -> None:
        """After `load_state_dict` from the checkpoint in `directory` (every rank)."""

    # --- aggregation --------------------------------------------------------------------
    @abstractmethod
    def contribution(self, update: ClientUpdate) -> dict[str, Tensor]:
        """One accepted update's tensors, summed over every client of the round."""

    @abstractmethod
    def finalize(self, sums: dict[str, Tensor]) -> dict[str, Any]:
        """The new global state from the round's `sums`; returns the method's metrics of it
        (JSON-able, {} for none), logged with the round."""

    # --- evaluation ---------------------------------------------------------------------
    def eval_setting(self, tier: Tier) -> ModelSetting:
        """The setting at which the global model is evaluated for `tier`."""
        return self.setting(tier.top_k, self.model.lora_rank)

    def eval_adapters(self, tier: Tier | None = None) -> dict[str, Tensor]:
        """The global adapters as a client of `tier` would start from (None: full rank)."""
        return self.global_adapters

    def base_delta(self) -> dict[str, Tensor]:
        """Dense updates merged into the frozen base, keyed by LoRA pair (see `lora_pairs`).

        Empty for methods that keep everything in the adapters; FLoRA, FedEx-LoRA and the
        merge-into-backbone family put their merged updates here.
        """
        return {}


def weighted_sum_contribution(adapters: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """`weight * adapter` for every tensor plus the weight itself: the FedAvg numerator and denominator.

    Summed in float64 so that the order of summation (one process vs a collective) barely matters.
    """
    out = {f"sum/{k}": v.double() * weight for k, v in adapters.items()}
    out["weight"] = torch.tensor([float(weight)], dtype=torch.float64)
    return out


def weighted_average(sums: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    total = sums["weight"].item()
    if total <= 0:
        raise ValueError("no client weight to average over")
    return {k: (sums[f"sum/{k}"] / total).to(v.dtype) for k, v in like.items()}


STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def check_method(name: str, options: dict) -> type[Strategy]:
    """The method's class, once its name and options are known good (ConfigError otherwise)."""
    if name not in STRATEGIES:
        raise ConfigError(f"algorithm.name: unknown method {name!r} (available: {', '.join(sorted(STRATEGIES))})")
    cls = STRATEGIES[name]
    check_options(name, options, cls.option_spec)
    return cls


def build_strategy(name: str, options: dict, model: ModelInfo, tiers: list[Tier]) -> Strategy:
    return check_method(name, options)(options, model, tiers)


def _prefixed(state: dict[str, Any], name: str) -> dict[str, Tensor]:
    prefix = f"{name}/"
    return {k[len(prefix):]: v.clone() for k, v in state["tensors"].items() if k.startswith(prefix)}
