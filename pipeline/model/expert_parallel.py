"""Expert parallelism inside one client group: each rank of an expert-parallel process group
holds a contiguous share of every MoE block's experts (their fused base weights and their LoRA)
and the routed tokens travel to them by all-to-all.

`enable_expert_parallel(model, group)` slices the blocks once; `HeteroMoEBlock.dispatch` then
routes locally over all experts (router, top-k and token counts are unchanged), sends every
(token, expert) pair's row to the rank owning the expert, computes the local experts and sends
the results back (`_dispatch_ep`). The exchange is `all_to_all_single`, which gloo has on CPU,
wrapped in an autograd Function whose backward is the reverse exchange.

`gathered_experts(model)` all-gathers the full expert tensors (and the pristine base of merged
deltas, pipeline/model/base_delta.py) for evaluation and export on one rank (every rank of the
group must enter it); `gather_expert_tensor` / `local_expert_slice`
convert full adapter tensors to and from a rank's share.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.model.base_delta import gathered_pristine
from pipeline.model.moe_block import EXPERT_LORA_NAMES, HeteroMoEBlock

BASE_NAMES = ("gate_up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `send` go to the group's ranks; `recv` rows come back from each.
    The gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                               input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send,
                               input_split_sizes=ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    return _AllToAll.apply(x, send, recv, group)


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    if num_experts % ep_size:
        raise ValueError(f"ep_size {ep_size} does not divide the {num_experts} experts")
    local = num_experts // ep_size
    return ep_rank * local, (ep_rank + 1) * local


def enable_expert_parallel(model: nn.Module, group) -> int:
    """Keep only this rank's experts in every MoE block; returns the expert-parallel size.

    The base weights and expert LoRA become new Parameters holding the local slice
    `[ep_rank * E / P, (ep_rank + 1) * E / P)`, so call this before the optimizer exists.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for block in model.modules():
        if not isinstance(block, HeteroMoEBlock):
            continue
        e0, e1 = expert_range(block.num_experts, rank, size)
        for name in BASE_NAMES:
            old = getattr(block.experts, name)
            setattr(block.experts, name, nn.Parameter(old.detach()[e0:e1].clone(),
                                                      requires_grad=old.requires_grad))
        for name in EXPERT_LORA_NAMES if block.has_lora else ():
            old = getattr(block, name)
            setattr(block, name, nn.Parameter(old.detach()[e0:e1].clone(),
                                              requires_grad=old.requires_grad))
        block.ep_group, block.ep_rank, block.ep_size = group, rank, size
        block.expert_start = e0
    return size


def ep_blocks(model: nn.Module) -> list[HeteroMoEBlock]:
    return [m for m in model.modules() if isinstance(m, HeteroMoEBlock) and m.ep_size > 1]


def local_expert_slice(value: Tensor, block: HeteroMoEBlock) -> Tensor:
    """This rank's rows of a full `[E, ...]` expert tensor."""
    local = block.num_experts // block.ep_size
    return value[block.expert_start:block.expert_start + local]


def gather_expert_tensor(local: Tensor, block: HeteroMoEBlock) -> Tensor:
    """The full `[E, ...]` tensor from every rank's share (a collective over the EP group)."""
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(block.ep_size)]
    dist.all_gather(parts, local, group=block.ep_group)
    return torch.cat(parts)


@contextmanager
def gathered_experts(model: nn.Module):
    """Inside: every block holds all experts (base weights and LoRA, all-gathered) and computes
    without exchange, so one rank alone can evaluate or export; a base delta set inside applies
    to the full weights (base_delta.gathered_pristine). On exit the local Parameters (the ones
    the optimizer holds) are put back unchanged. A collective on entry."""
    saved = []
    with gathered_pristine(model, gather_expert_tensor):
        for block in ep_blocks(model):
            names = [(block.experts, n) for n in BASE_NAMES]
            names += [(block, n) for n in (EXPERT_LORA_NAMES if block.has_lora else ())]
            old = [(owner, n, getattr(owner, n)) for owner, n in names]
            for owner, n, p in old:
                setattr(owner, n, nn.Parameter(gather_expert_tensor(p, block), requires_grad=p.requires_grad))
            saved.append((block, block.ep_size, block.ep_group, old))
            block.ep_size, block.ep_group = 1, None  # None: a deep copy (merge_adapters) must not copy it
        try:
            yield
        finally:
            for block, size, group, old in saved:
                for owner, n, p in old:
                    setattr(owner, n, p)
                block.ep_size, block.ep_group = size, group
