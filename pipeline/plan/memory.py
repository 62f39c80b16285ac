"""Per-GPU memory of each tier's client group: a planning estimate for `fedmoe plan`.

The bytes one GPU holds at the peak of a local step: frozen weights, adapters (with DeepSpeed's
fp32 master copy), AdamW's moments, gradients and saved activations, each divided by the ranks
ZeRO partitions it over, with 1/ep of the experts per rank under expert parallelism. The
activation term counts the tensors autograd saves per token (`activation_bytes_per_token`), so
it scales with top-k. A tier fits when its estimate is at most `HEADROOM` of
`tiers[].gpu_memory_gb`. The terms, their derivation and their calibration against measured
peaks: docs/memory-model.md.
A merge-into-backbone method (flora, fedex-lora, frlora, fedsmoothlora) adds the `method` term:
the pristine copy of the adapted base weights and, for fedsmoothlora with `ga` on, their fp32
calibration gradient; FedSmoothLoRA's per-client state is on disk (`client_state_bytes`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, Tier, resolve_tiers
from pipeline.engine.parallel_dims import ParallelDims
from pipeline.errors import UserError

GIB = 2**30
HEADROOM = 0.9  # share of a GPU's memory the estimate may use
MERGING_METHODS = ("flora", "fedex-lora", "frlora", "fedsmoothlora")  # keep a pristine base copy
OLMOE_1B_7B_IDS = ("allenai/OLMoE-1B-7B-0924",)  # hub ids whose config is OLMOE_1B_7B (no network)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of an OLMoE model that its memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    k_max: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   experts=config["num_experts"], k_max=config["num_experts_per_tok"],
                   vocab=config["vocab_size"], tied_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def frozen_params(self) -> int:
        """Every parameter of the Hugging Face model (our block reuses its weights)."""
        H, I, E = self.hidden, self.intermediate, self.experts
        attention = H * self.q_out + 2 * H * self.kv_out + self.q_out * H
        norms = 2 * H + self.q_out + self.kv_out  # input, post-attention, q_norm, k_norm
        layer = attention + norms + E * H + E * 3 * H * I  # + router + experts (gate_up, down)
        embeddings = self.vocab * H * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + H  # + final norm

    def adapter_params(self, rank: int, experts: bool = True, attention: bool = True) -> int:
        """LoRA parameters at rank `rank` (DMR's phi, E per layer, is left out: < 0.01%)."""
        H, I, E = self.hidden, self.intermediate, self.experts
        per_layer = 0
        if experts:  # gate_up A [E, r, H], B [E, 2I, r]; down A [E, r, I], B [E, H, r]
            per_layer += E * rank * (H + 2 * I + I + H)
        if attention:  # q, k, v, o: A [r, in], B [out, r]
            per_layer += rank * ((H + self.q_out) + 2 * (H + self.kv_out) + (self.q_out + H))
        return self.layers * per_layer


def model_shape(source: str) -> ModelShape:
    """The shape from `source`: a local directory's config.json, the OLMoE-1B-7B hub id (the
    published config, no network), or another hub id already in the Hugging Face cache."""
    from pipeline.federation.inputs import REPO_ROOT

    for candidate in (Path(source), REPO_ROOT / source):
        if (candidate / "config.json").is_file():
            try:
                return ModelShape.from_config(json.loads((candidate / "config.json").read_text()))
            except (ValueError, KeyError) as exc:
                raise UserError(f"model.source: {candidate / 'config.json'} is not an OLMoE config ({exc})") from None
    if source in OLMOE_1B_7B_IDS:
        from pipeline.model.build import OLMOE_1B_7B

        return ModelShape.from_config(OLMOE_1B_7B)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, local_files_only=True)
        return ModelShape.from_config(config.to_dict())
    except (OSError, ValueError, KeyError):
        raise UserError(f"model.source: cannot read the model config of {source!r} offline (a local "
                        f"directory, {OLMOE_1B_7B_IDS[0]}, or a hub id in the Hugging Face cache)") from None


@dataclass(frozen=True)
class TierMemory:
    """Bytes per GPU of one tier's client group (docs/memory-model.md)."""

    index: int
    tier: str
    top_k: int
    ranks: int
    zero_stage: int
    tokens_per_gpu: int
    frozen: float
    adapters: float
    optimizer: float
    gradients: float
    activations: float
    activations_checkpointed: float
    gpu_memory_gb: float
    method: float = 0.0  # a merging method's pristine base copy and calibration gradient
    checkpointing: str = "off"  # train.activation_checkpointing: auto | on | off

    @property
    def states(self) -> float:
        return self.frozen + self.adapters + self.optimizer + self.gradients + self.method

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.states + self.activations_checkpointed

    @property
    def usable(self) -> float:
        return HEADROOM * self.gpu_memory_gb * GIB

    @property
    def checkpointed(self) -> bool:
        """Whether its clients train with activation checkpointing: `on`, or `auto` where the
        total without it does not fit (the client engine decides the same way, on GPUs)."""
        return self.checkpointing == "on" or (self.checkpointing == "auto" and self.total > self.usable)

    @property
    def peak(self) -> float:
        return self.total_checkpointed if self.checkpointed else self.total

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def activation_bytes_per_token(shape: ModelShape, top_k: int, lora_rank: int, elem: int,
                               expert_lora: bool = True, attention_lora: bool = True) -> dict[str, float]:
    """Saved-activation bytes per token: `layer` (non-expert, one layer), `experts` (one layer at
    `top_k`), `once` (final norm, lm_head, loss); the terms are derived in docs/memory-model.md."""
    H, I, E, s = shape.hidden, shape.intermediate, shape.experts, elem
    layer = (s * (2 * H + 3 * shape.q_out + 2 * shape.kv_out) + 4 * (2 * H + shape.q_out + shape.kv_out)
             + 4 * E + 12 * top_k + (s * 4 * lora_rank if attention_lora else 0))
    pair = s * (2 * H + 5 * I) + (s * 2 * lora_rank if expert_lora else 0) + 24
    once = 4 * H + s * H + (10 + s) * shape.vocab
    return {"layer": layer, "experts": top_k * pair, "once": once}


def tier_memory(shape: ModelShape, cfg: Config, index: int, top_k: int, ranks: int) -> TierMemory:
    """Tier `index` training at `top_k` in a client group of `ranks` ranks (at its `ep_size`)."""
    bf16 = cfg.train.precision == "bf16"
    elem = 2 if bf16 or cfg.model.dtype == "bfloat16" else 4
    dims = ParallelDims(ranks, cfg.tiers[index].ep_size if ranks > 1 else 1)
    z, n, ep = cfg.deepspeed.zero_stage, dims.ranks, dims.ep
    lora = cfg.model.lora
    p_frozen = shape.frozen_params()
    p_adapt = shape.adapter_params(lora.rank, lora.experts, lora.attention)

    # Expert parallelism: a rank holds 1/ep of the experts and of their LoRA; ZeRO partitions
    # the expert LoRA's states over the n/ep ranks holding the same experts, so what ZeRO
    # partitions is p/n either way.
    H, I, E = shape.hidden, shape.intermediate, shape.experts
    expert_frozen = shape.layers * E * 3 * H * I
    expert_adapt = shape.layers * E * lora.rank * (2 * H + 3 * I) if lora.experts else 0
    local_frozen = p_frozen - expert_frozen * (1 - 1 / ep)
    local_adapt = p_adapt - expert_adapt * (1 - 1 / ep)

    def per_rank(local, total, partitioned):
        return total / n if partitioned else local

    frozen = elem * per_rank(local_frozen, p_frozen, z >= 3)
    master = 4 * per_rank(local_adapt, p_adapt, z >= 1) if (bf16 or z >= 1) else 0.0
    adapters = elem * per_rank(local_adapt, p_adapt, z >= 3) + master
    optimizer = 8 * per_rank(local_adapt, p_adapt, z >= 1)
    gradients = 4 * per_rank(local_adapt, p_adapt, z >= 2) + (elem * local_adapt if bf16 and z < 2 else 0.0)

    method = method_bytes(shape, cfg, ep, elem)

    tokens = math.ceil(cfg.train.batch_size / n) * cfg.train.max_length
    per = activation_bytes_per_token(shape, top_k, lora.rank, elem, lora.experts, lora.attention)
    full = shape.layers * (per["layer"] + per["experts"]) + per["once"]
    checkpointed = shape.layers * elem * shape.hidden + max(per["once"], 2 * (per["layer"] + per["experts"]))
    tier = cfg.tiers[index]
    return TierMemory(index, tier.name, top_k, n, z, tokens, frozen, adapters, optimizer, gradients,
                      tokens * full, tokens * checkpointed, tier.gpu_memory_gb, method,
                      cfg.train.activation_checkpointing)


def adapted_base_params(shape: ModelShape, cfg: Config, ep: int = 1) -> float:
    """Base weights that carry a LoRA on one rank: attention projections, 1/ep of the experts."""
    H, I, E = shape.hidden, shape.intermediate, shape.experts
    lora = cfg.model.lora
    attention = 2 * H * shape.q_out + 2 * H * shape.kv_out if lora.attention else 0
    experts = E * 3 * H * I / ep if lora.experts else 0
    return shape.layers * (attention + experts)


def method_bytes(shape: ModelShape, cfg: Config, ep: int, elem: int) -> float:
    """A merging method's pristine base copy (device, ZeRO < 3) and fedsmoothlora's fp32
    calibration gradient, per rank."""
    name = cfg.algorithm.name
    if name not in MERGING_METHODS:
        return 0.0
    base = adapted_base_params(shape, cfg, ep)
    out = elem * base if cfg.deepspeed.zero_stage < 3 else 0.0
    if name == "fedsmoothlora" and cfg.algorithm.options.get("ga", True):
        out += 4 * base
    return out


def client_state_bytes(shape: ModelShape, cfg: Config) -> float:
    """fedsmoothlora's per-client state on disk: one fp32 rank-r adapter per virtual client."""
    if cfg.algorithm.name != "fedsmoothlora":
        return 0.0
    lora = cfg.model.lora
    return 4 * shape.adapter_params(lora.rank, lora.experts, lora.attention) * cfg.federation.clients


def training_top_k(cfg: Config, shape: ModelShape, tiers: list[Tier]) -> list[int]:
    """The top-k each tier's clients train at, as the method plans them (the low-rank methods and
    fedavg train every tier at K_max); K_max where a method cannot plan without real adapters."""
    from pipeline.algorithms import ModelInfo, build_strategy

    info = ModelInfo(shape.layers, shape.experts, shape.k_max, cfg.model.lora.rank, cfg.model.lora.alpha)
    strategy = build_strategy(cfg.algorithm.name, cfg.algorithm.options, info, tiers)
    try:
        strategy.init_state({})  # plans carry the adapters; the top-k does not depend on them
        return [strategy.plan(0, 1, tier).top_k for tier in tiers]
    except (KeyError, ValueError, RuntimeError, IndexError):
        return [shape.k_max for _ in tiers]


def plan_memory(cfg: Config, world_size: int | None = None, shape: ModelShape | None = None) -> list[TierMemory]:
    """One row per tier at the top-k its clients train at and its group size (`tiers[].ranks`;
    1 for everyone when the world has one rank, whose single process trains every tier)."""
    shape = shape or model_shape(cfg.model.source)
    tiers = resolve_tiers(cfg, shape.experts, shape.k_max)
    top_ks = training_top_k(cfg, shape, tiers)
    return [tier_memory(shape, cfg, t.index, k, 1 if world_size == 1 else cfg.tiers[t.index].ranks)
            for t, k in zip(tiers, top_ks)]


def check_fits(rows: list[TierMemory]) -> None:
    """UserError naming the first tier whose estimate exceeds its usable GPU memory."""
    for row in rows:
        if row.fits:
            continue
        hint = ("lower train.batch_size or train.max_length, or raise tiers.{i}.ranks to split the batch"
                .format(i=row.index))
        if row.total_checkpointed <= row.usable:
            hint += " (or set train.activation_checkpointing to auto or on: it would fit with it)"
        activations = row.activations_checkpointed if row.checkpointed else row.activations
        raise UserError(
            f"tiers.{row.index} ({row.tier}, top_k={row.top_k}, {row.ranks} rank(s)): needs about "
            f"{row.peak / GIB:.1f} GiB per GPU (activations {activations / GIB:.1f} for "
            f"{row.tokens_per_gpu} tokens{', checkpointed' if row.checkpointed else ''}) but "
            f"{HEADROOM:.0%} of tiers.{row.index}.gpu_memory_gb="
            f"{row.gpu_memory_gb:g} is {row.usable / GIB:.1f} GiB; {hint}")
