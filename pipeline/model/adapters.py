"""Adapters as the unit of exchange: a flat, ordered `dict[str, Tensor]` of trainable tensors.

A parameter is an adapter by its name: its last component starts with `lora_` (attention
LoRA `...q_proj.lora_A`, expert LoRA `...mlp.lora_gate_up_A`) or is a routing variant's
trainable vector listed in `ROUTING_ADAPTER_NAMES` (DMR's `phi`). Names rather than
`requires_grad` so that freezing a model for evaluation does not change its adapter set.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import EXPERT_LORA_NAMES, HeteroMoEBlock

ROUTING_ADAPTER_NAMES = frozenset({"phi"})


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_adapter_name(name: str) -> bool:
    leaf = _leaf(name)
    return leaf.startswith("lora_") or leaf in ROUTING_ADAPTER_NAMES


def is_expert_adapter(name: str) -> bool:
    """True for expert-LoRA tensors (leading dimension = num_experts)."""
    return _leaf(name) in EXPERT_LORA_NAMES


def _is_lora_a(name: str) -> bool:
    return _leaf(name) in ("lora_A", "lora_gate_up_A", "lora_down_A")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters, in `named_parameters` order."""
    return {n: p for n, p in model.named_parameters() if is_adapter_name(n)}


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached fp32 clones of the adapter parameters."""
    return {n: p.detach().float().clone() for n, p in adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` into the adapters; the key set and shapes must match exactly."""
    params = adapter_parameters(model)
    missing = [n for n in params if n not in state]
    if missing:
        raise ValueError(f"adapter state lacks {missing[0]!r} ({len(missing)} missing)")
    unexpected = [n for n in state if n not in params]
    if unexpected:
        raise ValueError(f"adapter state has unknown key {unexpected[0]!r} ({len(unexpected)} unknown)")
    for name, p in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"adapter {name!r}: shape {tuple(value.shape)}, model has {tuple(p.shape)}")
    for name, p in params.items():
        p.copy_(state[name].to(device=p.device, dtype=p.dtype))


def init_adapter_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A fresh adapter state (the model is not changed), deterministic in `seed`.

    LoRA A like peft: kaiming_uniform(a=sqrt(5)) over each matrix's input features, i.e.
    U(-1/sqrt(in), 1/sqrt(in)), also per expert for `[E, r, in]`; LoRA B and routing vectors 0.
    Drawn in `named_parameters` order from one generator seeded with `seed`.
    """
    gen = torch.Generator().manual_seed(int(seed))
    state = {}
    for name, p in adapter_parameters(model).items():
        if _is_lora_a(name):
            bound = 1.0 / math.sqrt(p.shape[-1])
            state[name] = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound
        else:
            state[name] = torch.zeros(p.shape, dtype=torch.float32)
    return state


def moe_blocks(model: nn.Module) -> list[HeteroMoEBlock]:
    return [m for m in model.modules() if isinstance(m, HeteroMoEBlock)]


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with a LoRA rank: LoRALinear and the blocks that carry expert LoRA."""
    return [m for m in model.modules()
            if isinstance(m, LoRALinear) or (isinstance(m, HeteroMoEBlock) and m.has_lora)]


def _patched_blocks(model: nn.Module) -> list[HeteroMoEBlock]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("model has no HeteroMoEBlock: call patch_olmoe first")
    return blocks


def set_top_k(model: nn.Module, k: int) -> None:
    """Experts per token for the next forward passes, in every MoE block."""
    blocks = _patched_blocks(model)
    num_experts = blocks[0].num_experts
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}], got {k!r}")
    for block in blocks:
        block.top_k = k


def set_lora_rank(model: nn.Module, r: int) -> None:
    """Use the first `r` ranks of every LoRA (scale alpha / r); r <= the rank it was built with."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules: call patch_olmoe first")
    built = min(m.rank for m in modules)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= built:
        raise ValueError(f"lora rank must be an integer in [1, {built}], got {r!r}")
    for m in modules:
        m.active_rank = r


def set_lora_scale(model: nn.Module, scale: float | None) -> None:
    """A LoRA scale for every rank (`alpha = scale * r`, as the heterogeneous-rank codes set
    `alpha = 2 r`), or None for `alpha / r` with the alpha the model was built with."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules: call patch_olmoe first")
    if scale is not None and not scale > 0:
        raise ValueError(f"lora scale must be > 0, got {scale!r}")
    for m in modules:
        m.scale_override = None if scale is None else float(scale)


def expert_token_counts(model: nn.Module) -> Tensor:
    """Routed-token counts since the last reset, [num_layers, num_experts] float64 on CPU.

    Only real tokens count: the model hands its attention mask to the blocks, which do not
    route pads. Each layer's row sums to real tokens * top_k.
    """
    return torch.stack([b.token_counts.detach().cpu() for b in _patched_blocks(model)]).double()


def reset_expert_token_counts(model: nn.Module) -> None:
    for block in _patched_blocks(model):
        block.token_counts.zero_()
