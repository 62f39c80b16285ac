"""Expert parallelism inside a client group, applied to the model from outside.

`ExpertParallel(group).apply(model)` keeps, in every MoE block, only this rank's share of the
experts (rank p of P: experts [p E/P, (p+1) E/P) of the fused base weights and of the expert
LoRA) and installs itself as the blocks' `token_exchange`. A block then routes locally over all
experts (router, top-k and token counts are unchanged) and hands its routed rows, sorted by
expert, to `dispatch`, which sends each row to the rank owning its expert; the block computes
its local experts and `combine` brings the results back in the original order. Both exchanges
are `all_to_all_single` (gloo has it on CPU) inside an autograd Function whose backward is the
reverse exchange. The block holds no process group and calls no collective
(pipeline/model/moe_block.py).

`gathered(model)` all-gathers the full expert tensors (and the pristine base of merged deltas,
pipeline/model/base_delta.py) so that one rank alone can evaluate or export; `gather` and
`local_rows` convert full adapter tensors to and from this rank's share.

On the DeepSpeed side (`setup`): the group's torch world is split by DeepSpeed's own MoE groups,
expert-parallel groups of `ep` consecutive ranks (the all-to-all runs there) and
expert-data-parallel groups of the ranks holding the same experts. Expert-LoRA parameters carry
DeepSpeed's MoE marking (`allreduce = False`, `group_name = "ep_size_<P>"`) and sit in their own
optimizer groups (`split_params_into_different_moe_groups_for_optimizer`), so ZeRO 0 all-reduces
them over the expert-data-parallel group only and ZeRO 1/2 partition and reduce them there. Both
divide by the whole group's size, as for the other adapters: an expert's gradient already sums
every rank's tokens routed to it, and each rank's loss carries the factor `dp_size`
(data_parallel.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.engine.parallel_dims import ParallelDims
from pipeline.model.adapters import moe_blocks
from pipeline.model.base_delta import gathered_pristine
from pipeline.model.moe_block import EXPERT_LORA_NAMES, HeteroMoEBlock, gather_rows

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


def _expert_params(block: HeteroMoEBlock) -> list[tuple[nn.Module, str]]:
    """(owner, name) of every tensor indexed by expert: the fused base weights and expert LoRA."""
    return ([(block.experts, n) for n in BASE_NAMES]
            + [(block, n) for n in (EXPERT_LORA_NAMES if block.has_lora else ())])


class ExpertParallel:
    """The expert-parallel process group of this rank and the exchange of routed rows over it."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """The experts [start, stop) this rank holds (ParallelDims' rule, within this group)."""
        return ParallelDims(self.size, self.size).expert_range(num_experts, self.rank)

    def apply(self, model: nn.Module) -> list[HeteroMoEBlock]:
        """Keep only this rank's experts in every MoE block and route their tokens through this
        exchange; returns the blocks. The expert tensors become new Parameters holding the
        local slice, so call this before the optimizer exists."""
        blocks = moe_blocks(model)
        for block in blocks:
            e0, e1 = self.expert_range(block.num_experts)
            for owner, name in _expert_params(block):
                old = getattr(owner, name)
                setattr(owner, name, nn.Parameter(old.detach()[e0:e1].clone(), requires_grad=old.requires_grad))
            block.expert_range = (e0, e1)
            block.token_exchange = self
        return blocks

    # --- the exchange a block calls --------------------------------------------------------
    def dispatch(self, xs: Tensor, w: Tensor, counts: Tensor):
        """`xs` [S, H]: the routed rows sorted by expert, `w` [S] their routing weights, `counts`
        [E] rows per expert. Rows (with their weight as one more column, so the router's
        gradient travels back too) go to the rank owning their expert. Returns this rank's rows
        grouped by local expert, their weights [R, 1], the cumulative rows per local expert, and
        what `combine` needs to send the results back."""
        P = self.size
        L = counts.numel() // P
        # recv[s, j]: rows rank s sends to my local expert j (experts are contiguous per rank).
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        recv = recv.view(P, L)
        send_sizes = counts.view(P, L).sum(1).tolist()
        recv_sizes = recv.sum(1).tolist()
        rows = all_to_all(torch.cat([xs, w[:, None].to(xs.dtype)], 1), send_sizes, recv_sizes, self.group)
        # Received rows are ordered by source rank, then local expert: regroup by local expert.
        local_expert = torch.repeat_interleave(torch.arange(L, device=rows.device).repeat(P),
                                               recv.reshape(-1))
        perm = torch.argsort(local_expert, stable=True)
        rows = gather_rows(rows, perm)
        offsets = torch.cumsum(recv.sum(0), 0, dtype=torch.int32)
        return rows[:, :-1], rows[:, -1:], offsets, (perm, send_sizes, recv_sizes)

    def combine(self, y: Tensor, sent) -> Tensor:
        """The local experts' outputs back to the ranks that sent the rows, in `xs`'s order."""
        perm, send_sizes, recv_sizes = sent
        y = gather_rows(y, torch.argsort(perm))  # back to source order
        return all_to_all(y, recv_sizes, send_sizes, self.group)

    # --- whole tensors ----------------------------------------------------------------------
    def local_rows(self, value: Tensor) -> Tensor:
        """This rank's rows of a full `[E, ...]` expert tensor."""
        start, stop = self.expert_range(value.shape[0])
        return value[start:stop]

    def gather(self, local: Tensor) -> Tensor:
        """The full `[E, ...]` tensor from every rank's share (a collective over the group)."""
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts)

    @contextmanager
    def gathered(self, model: nn.Module):
        """Inside: every block holds all experts (base weights and LoRA, all-gathered) and
        computes without exchange, so one rank alone can evaluate or export; a base delta set
        inside applies to the full weights (base_delta.gathered_pristine). On exit the local
        Parameters (the ones the optimizer holds) are put back unchanged. A collective on entry."""
        saved = []
        with gathered_pristine(model, self.gather):
            for block in [m for m in model.modules() if getattr(m, "token_exchange", None) is self]:
                old = [(owner, n, getattr(owner, n)) for owner, n in _expert_params(block)]
                for owner, n, p in old:
                    setattr(owner, n, nn.Parameter(self.gather(p), requires_grad=p.requires_grad))
                saved.append((block, block.expert_range, old))
                # None: a deep copy of the model (merge_adapters) must not copy the process group
                block.token_exchange, block.expert_range = None, (0, block.num_experts)
            try:
                yield
            finally:
                for block, expert_range, old in saved:
                    for owner, n, p in old:
                        setattr(owner, n, p)
                    block.token_exchange, block.expert_range = self, expert_range


# --- DeepSpeed -------------------------------------------------------------------------------
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
            pass  # the groups exist already (setup)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker


def setup(model: nn.Module, dims: ParallelDims) -> ExpertParallel:
    """DeepSpeed's expert(-data)-parallel groups over the current world, the blocks sliced to
    this rank's experts, and the expert tensors marked as MoE parameters. Before the optimizer."""
    from deepspeed.utils import groups

    name = f"ep_size_{dims.ep}"
    groups._create_expert_and_data_parallel(dims.ep)
    ep = ExpertParallel(groups._get_expert_parallel_group(name))
    blocks = ep.apply(model)
    for block in blocks:  # frozen base experts too: DeepSpeed's initial broadcast must skip them
        for owner, n in _expert_params(block):
            p = getattr(owner, n)
            p.allreduce, p.group_name = False, name
    if blocks:
        model.add_module("fedmoe_expert_parallel", _marker_class()(blocks[0].num_experts, dims.ep))
    return ep


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
