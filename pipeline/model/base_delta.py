"""Dense updates merged into the frozen base weights (FLoRA, FedEx-LoRA, merge-into-backbone).

A delta is keyed like its LoRA pair (`<module>.lora_gate_up`, `<module>.lora_down`,
`<linear>.lora`) and has the base weight's shape. The pristine base is kept once, so setting a
delta is `W = W0 + delta` every time: no drift from repeated in-place additions, and a resumed
run rebuilds bitwise the same weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock


def lora_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Pair key -> the frozen base weight that pair adapts."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, HeteroMoEBlock) and module.has_lora:
            out[f"{name}.lora_gate_up"] = module.experts.gate_up_proj
            out[f"{name}.lora_down"] = module.experts.down_proj
        elif isinstance(module, LoRALinear):
            out[f"{name}.lora"] = module.base.weight
    return out


@torch.no_grad()
def set_base_delta(model: nn.Module, deltas: dict[str, Tensor]) -> None:
    """Set every adapted base weight to its pristine value plus `deltas[key]` (zero if absent)."""
    weights = lora_base_weights(model)
    unknown = sorted(set(deltas) - set(weights))
    if unknown:
        raise ValueError(f"base delta for unknown LoRA pair {unknown[0]!r}")
    pristine = getattr(model, "_fedmoe_pristine_base", None)
    if pristine is None:
        if not deltas:
            return  # nothing merged yet: no copy needed
        pristine = {k: w.detach().clone() for k, w in weights.items()}
        model._fedmoe_pristine_base = pristine
    for key, w in weights.items():
        value = pristine[key]
        if key in deltas:
            value = value + deltas[key].to(device=w.device, dtype=value.dtype)
        w.data.copy_(value)
