"""Routing variants of HeteroMoEBlock, switched on per model.

- DMR modulation (UB-SMoE): a learnable shift `phi [E]` per layer added to the router logits
  of the top-`n_candidates` experts before the softmax; `phi` is an adapter tensor.
- Selection-only bias (loss-free balancing): `selection_bias [E]` per layer added to the
  routing probabilities when choosing the top-k, never to the gate weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.adapters import moe_blocks


def enable_routing_modulation(model: nn.Module, n_candidates: int) -> None:
    """Give every MoE layer a trainable `phi` (zeros, fp32) applied inside its top-N_p candidates."""
    for block in moe_blocks(model):
        if not 1 <= n_candidates <= block.num_experts:
            raise ValueError(f"n_candidates must be in [1, {block.num_experts}], got {n_candidates}")
        block.n_candidates = int(n_candidates)
        block.phi = nn.Parameter(torch.zeros(block.num_experts, device=block.gate.weight.device))


def set_record_routing(model: nn.Module, on: bool) -> None:
    for block in moe_blocks(model):
        block.record_routing = on
        if not on:
            block.last_routing = None


def set_selection_bias(model: nn.Module, bias: Tensor | None) -> None:
    """bias [layers, experts] (or None to remove)."""
    blocks = moe_blocks(model)
    if bias is not None and tuple(bias.shape) != (len(blocks), blocks[0].num_experts):
        raise ValueError(f"selection bias of shape {tuple(bias.shape)}, expected "
                         f"({len(blocks)}, {blocks[0].num_experts})")
    for i, block in enumerate(blocks):
        block.selection_bias = None if bias is None else bias[i].detach().float().clone().to(block.gate.weight.device)


def selection_bias(model: nn.Module) -> Tensor:
    blocks = moe_blocks(model)
    return torch.stack([b.selection_bias.cpu() if b.selection_bias is not None
                        else torch.zeros(b.num_experts) for b in blocks])
