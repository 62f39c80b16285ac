"""Per-GPU memory of each tier's client group: a planning estimate for `fedmoe plan`.

For a tier whose client group spans `n` ranks (`tiers[].ranks`, one GPU each) under ZeRO stage
`z`, the bytes one GPU holds at the peak of a local step are the sum of

- frozen: every non-adapter parameter at the training dtype (bf16 when `train.precision` is
  bf16, since DeepSpeed casts the module; else `model.dtype`); divided by `n` at ZeRO 3.
- adapters: the trainable copy at the training dtype (divided by `n` at ZeRO 3) plus DeepSpeed's
  fp32 master copy, which exists under bf16 or ZeRO >= 1 (divided by `n` at ZeRO >= 1).
  Every client allocates adapters at `model.lora.rank` (r_max): low-rank tiers use a slice.
- optimizer: AdamW's two fp32 moments per adapter parameter (divided by `n` at ZeRO >= 1).
- gradients: the fp32 gradient the optimizer steps on (divided by `n` at ZeRO >= 2), plus the
  training-dtype `.grad` backward writes under bf16 at ZeRO 0/1 (ZeRO 2 reduces it bucket by
  bucket into the partition).
- expert parallelism (`tiers[].ep_size` = P): a rank holds 1/P of the experts' frozen weights
  and of the expert LoRA with its states; the ZeRO-partitioned terms stay p / n (the expert
  LoRA is partitioned over the n / P ranks holding the same experts). Activations are counted
  as without it (the routed pairs a rank computes average its own tokens' pairs).
- method: what a merge-into-backbone method (flora, fedex-lora, frlora, fedsmoothlora) adds:
  the pristine copy of every adapted base weight (attention projections and this rank's
  experts, at the model dtype; on the CPU under ZeRO 3, so not counted there), and for
  fedsmoothlora with `ga` on the fp32 calibration gradient of the same weights (formed on the
  device, whatever the ZeRO stage: pipeline/engine/calibration.py). FedSmoothLoRA's per-client
  state is on disk, not in memory: `client_state_bytes` (one fp32 adapter per virtual client).
- activations: tokens per GPU (`ceil(train.batch_size / n) * train.max_length`, the padded
  upper bound) times the bytes per token below, counted from the tensors autograd saves
  (element size `s`: 2 under bf16, else 4), with T = training dtype:
    per layer    s * (2H + 3 q_out + 2 kv_out)  normed inputs of q/k/v and of the router, rotated
                                                 q and k, v, the attention output and o_proj's input
                 + 4 * (2H + q_out + kv_out)     fp32 copies kept by the four RMSNorms (input,
                                                 post-attention, q_norm, k_norm)
                 + 4 * E + 12 * top_k            fp32 router probabilities, top-k indices/weights
                 + s * 4r                        attention-LoRA intermediates (when on)
    per routed (token, expert) pair, top_k of them per token and layer:
                 s * (2H + 5I) + s * 2r + 24     gathered input, down output (kept by
                                                 index_add), gate_up output, SiLU output, its
                                                 product with up and the routing-weighted input
                                                 of down; expert-LoRA intermediates; int64 indices
    once         4H + s * H + (10 + s) * V       final norm, lm_head input; the loss: logits in T
                                                 and fp32 log-softmax, its gradient and the input
                                                 gradient at the loss backward (12.1 V bytes
                                                 measured at bf16, below)
  The expert term is why activations scale with top_k. With activation checkpointing (one
  checkpoint per decoder layer, as `gradient_checkpointing_enable` makes it) only each layer's
  input stays, `s * H` per layer, and the peak is the larger of the loss (`once`) and one layer
  recomputed during its backward, counted twice (its saved tensors and the gradients of the
  same size that coexist with them). The client engine does not switch checkpointing on today;
  the column shows what it would buy.

A tier fits when the estimate without checkpointing is at most `HEADROOM` of
`tiers[].gpu_memory_gb` (GiB): the rest is left to the CUDA context, communication buffers and
allocator fragmentation. Parameter and saved-tensor counts assume OLMoE's architecture (q/k
norms over the whole projection, SwiGLU experts) and a fused attention kernel (memory linear
in the sequence length); an eager attention would add `4 * heads * S` bytes per token and layer.

Calibration (H200, random OLMoE-1B-7B, bf16, our DeepSpeed client (bench/tier_step.py), LoRA r=8
on attention and experts; peak `torch.cuda.max_memory_allocated`, reset per top-k):

    batch x seq   K   ZeRO  checkpointing   measured GiB    this estimate GiB
    4 x 512       8    0        no              21.0          21.6   (+3%)
    4 x 512       2    0        no              17.7          18.2   (+3%)
    16 x 1024     8    0        no              72.2          74.6   (+3%)
    16 x 1024     2    0        no              45.1          47.5   (+5%)
    32 x 2048     8    0        no          out of memory      257   (> 139.8: no fit either)
    16 x 1024     8/2  0        yes             24.1          24.4   (+1%)
    32 x 2048     8/2  0        yes             55.1          55.6   (+1%)
    4 x 512       8    2        no              21.0          21.5   (+2%)
    4 x 512       2    2        no              18.1          18.1   (+0%)

The measured K=8 minus K=2 slope is 18.0-18.5 KB per routed pair and layer; the pair term
gives 18.5 KB. Static state is 14.0 GiB (6.92 B frozen parameters in bf16 and 60.8 M adapter
parameters); the non-expert activations are over-estimated by up to 10%, which keeps the
check on the safe side. With checkpointing the loss sets the peak whatever the top-k (the
measured peaks of K=8 and K=2 were equal), as the max above says. On CPU, the bytes autograd
saves per layer and token at these dimensions (saved-tensor hooks, bf16) were 27 H for the
non-expert part against 30 H counted here, and 18.5 KB per routed pair. Untested: ZeRO 1-3
across several ranks, other GPUs' allocators, eager attention.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, Tier, resolve_tiers
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
    """Bytes per GPU of one tier's client group (see the module docstring)."""

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
    def fits(self) -> bool:
        return self.total <= self.usable


def activation_bytes_per_token(shape: ModelShape, top_k: int, lora_rank: int, elem: int,
                               expert_lora: bool = True, attention_lora: bool = True) -> dict[str, float]:
    """Saved-activation bytes per token: `layer` (non-expert, one layer), `experts` (one layer at
    `top_k`), `once` (final norm, lm_head, loss); see the module docstring."""
    H, I, E, s = shape.hidden, shape.intermediate, shape.experts, elem
    layer = (s * (2 * H + 3 * shape.q_out + 2 * shape.kv_out) + 4 * (2 * H + shape.q_out + shape.kv_out)
             + 4 * E + 12 * top_k + (s * 4 * lora_rank if attention_lora else 0))
    pair = s * (2 * H + 5 * I) + (s * 2 * lora_rank if expert_lora else 0) + 24
    once = 4 * H + s * H + (10 + s) * shape.vocab
    return {"layer": layer, "experts": top_k * pair, "once": once}


def tier_memory(shape: ModelShape, cfg: Config, index: int, top_k: int, ranks: int) -> TierMemory:
    bf16 = cfg.train.precision == "bf16"
    elem = 2 if bf16 or cfg.model.dtype == "bfloat16" else 4
    z, n = cfg.deepspeed.zero_stage, ranks
    lora = cfg.model.lora
    p_frozen = shape.frozen_params()
    p_adapt = shape.adapter_params(lora.rank, lora.experts, lora.attention)

    # Expert parallelism (tiers[].ep_size): a rank holds 1/ep of the experts and of their LoRA;
    # ZeRO partitions the expert LoRA's states over the n/ep ranks holding the same experts,
    # so what ZeRO partitions is p/n either way.
    ep = cfg.tiers[index].ep_size if n > 1 else 1
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
                      tokens * full, tokens * checkpointed, tier.gpu_memory_gb, method)


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
            hint += " (activation checkpointing would fit, but the client engine does not enable it yet)"
        raise UserError(
            f"tiers.{row.index} ({row.tier}, top_k={row.top_k}, {row.ranks} rank(s)): needs about "
            f"{row.total / GIB:.1f} GiB per GPU (activations {row.activations / GIB:.1f} for "
            f"{row.tokens_per_gpu} tokens) but {HEADROOM:.0%} of tiers.{row.index}.gpu_memory_gb="
            f"{row.gpu_memory_gb:g} is {row.usable / GIB:.1f} GiB; {hint}")


def memory_table(rows: list[TierMemory], cfg: Config):
    """GiB per GPU; `adapter+opt` = adapters + fp32 master + optimizer state + gradients;
    `w/ ckpt`: the total with activation checkpointing."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"estimated peak GiB per GPU: {cfg.model.source}, {cfg.train.precision}, ZeRO "
                        f"{cfg.deepspeed.zero_stage}, batch {cfg.train.batch_size} x {cfg.train.max_length}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    method = any(r.method for r in rows)
    for column in ("tier", "k", "ranks", "tokens", "frozen", "adapter+opt", *(["method"] if method else []),
                   "activ.", "total", "w/ ckpt", "GPU", "fits"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for r in rows:
        values = (r.frozen, r.adapters + r.optimizer + r.gradients, *([r.method] if method else []),
                  r.activations, r.total, r.total_checkpointed)
        table.add_row(r.tier, str(r.top_k), str(r.ranks), str(r.tokens_per_gpu),
                      *(f"{v / GIB:.2f}" for v in values), f"{r.gpu_memory_gb:g}", "yes" if r.fits else "NO")
    return table


def memory_report(cfg: Config, world_size: int, console) -> list[TierMemory]:
    """`fedmoe plan`: print the table; UserError if a tier cannot fit (after the table). A model
    whose config cannot be read offline gets a note instead: the layout is still valid."""
    try:
        shape = model_shape(cfg.model.source)
    except UserError as exc:
        console.print(f"memory: not estimated: {exc}")
        return []
    rows = plan_memory(cfg, world_size, shape)
    console.print(memory_table(rows, cfg))
    if any(r.method for r in rows):
        console.print("method: the pristine copy of the adapted base weights (ZeRO < 3)"
                      + (" and the fp32 calibration gradient of the same weights"
                         if cfg.algorithm.name == "fedsmoothlora" and cfg.algorithm.options.get("ga", True) else ""))
    state = client_state_bytes(shape, cfg)
    if state:
        console.print(f"per-client state: {state / GIB:.2f} GiB on disk under RUN/client_state "
                      f"({cfg.federation.clients} clients, one fp32 adapter each; none held in memory)")
    check_fits(rows)
    return rows
