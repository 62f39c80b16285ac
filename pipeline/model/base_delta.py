"""Dense updates merged into the frozen base weights (FLoRA, FedEx-LoRA, merge-into-backbone).

A delta is keyed like its LoRA pair (`<module>.lora_gate_up`, `<module>.lora_down`,
`<linear>.lora`) and has the base weight's shape. The pristine base is kept once, so setting a
delta is `W = W0 + delta` every time: no drift from repeated in-place additions, and a resumed
run rebuilds bitwise the same weights.

Under ZeRO-3 the base weights are partitioned: each is gathered whole, written and partitioned
again (pipeline.model.zero3; every rank of the group calls this with the same deltas), and the
pristine copy stays on the CPU so that it does not undo ZeRO-3's saving on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock
from pipeline.model.zero3 import gathered, is_partitioned


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
        pristine = model._fedmoe_pristine_base = {}
    for key, w in weights.items():
        with gathered([w], modify=True):  # one weight at a time: ZeRO-3 never holds them all
            if key not in pristine:
                pristine[key] = w.detach().to("cpu" if is_partitioned(w) else w.device, copy=True)
            value = pristine[key].to(w.device)
            if key in deltas:
                value = value + deltas[key].to(device=w.device, dtype=value.dtype)
            w.data.copy_(value)
