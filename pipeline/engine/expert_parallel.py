"""Expert parallelism inside a client group, on the DeepSpeed side (the model side is
pipeline/model/expert_parallel.py).

The group's torch world is split by DeepSpeed's own MoE groups: expert-parallel groups of
`ep_size` consecutive ranks (the all-to-all runs there) and expert-data-parallel groups of the
ranks holding the same experts. Expert-LoRA parameters carry DeepSpeed's MoE marking
(`allreduce = False`, `group_name = "ep_size_<P>"`) and sit in their own optimizer groups
(`split_params_into_different_moe_groups_for_optimizer`), so ZeRO 0 all-reduces them over the
expert-data-parallel group only and ZeRO 1/2 partition and reduce them there. Both divide by the
whole group's size, as for the other adapters: an expert's gradient already sums every rank's
tokens routed to it, and each rank's loss carries the factor `dp_size` (data_parallel.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.model.expert_parallel import (BASE_NAMES, enable_expert_parallel, ep_blocks, gather_expert_tensor,
                                            local_expert_slice)
from pipeline.model.moe_block import EXPERT_LORA_NAMES

__all__ = ["setup_expert_parallel", "clip_grad_norm", "gather_expert_tensor", "local_expert_slice"]


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """No parameters, never called: DeepSpeed turns on its MoE handling (expert gradient
        groups, `has_moe_layers`) only when the model holds a `deepspeed.moe.layer.MoE`."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups exist already (setup_expert_parallel)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker


def setup_expert_parallel(model: nn.Module, ep_size: int) -> list:
    """DeepSpeed's expert(-data)-parallel groups over the current world, the blocks sliced to
    this rank's experts, and the expert LoRA marked as MoE parameters. Before the optimizer."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    groups._create_expert_and_data_parallel(ep_size)
    enable_expert_parallel(model, groups._get_expert_parallel_group(name))
    blocks = ep_blocks(model)
    for block in blocks:  # frozen base experts too: DeepSpeed's initial broadcast must skip them
        owned = [getattr(block.experts, n) for n in BASE_NAMES]
        owned += [getattr(block, n) for n in (EXPERT_LORA_NAMES if block.has_lora else ())]
        for p in owned:
            p.allreduce, p.group_name = False, name
    if blocks:
        model.add_module("fedmoe_expert_parallel", _marker_class()(blocks[0].num_experts, ep_size))
    return blocks


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, ep_group) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: the replicated adapters' squares once,
    the experts' squares summed over the expert-parallel group (each expert once), with
    DeepSpeed's formula coef = min(1, max_norm / (norm + 1e-6))."""
    dense, expert = [], []
    for p in params:
        if p.grad is not None:
            (expert if getattr(p, "allreduce", True) is False else dense).append(p.grad)
    sq = lambda gs: (torch.stack([torch.linalg.vector_norm(g.float()) for g in gs]).pow(2).sum()
                     if gs else torch.zeros((), dtype=torch.float32))
    experts = sq(expert).reshape(1)
    dist.all_reduce(experts, group=ep_group)
    total = (sq(dense) + experts[0]).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in dense + expert:
        g.mul_(coef.to(g.dtype))
    return total
