"""Data parallelism inside one client group: shard every batch over the group's ranks and make
each step equal to the single-process step on the whole batch.

DeepSpeed averages gradients over the group's ranks, so rank r's loss is
`size * (sum of the token losses of its shard) / (answer tokens in the whole batch)`: the
average of these gradients is the gradient of the whole batch's mean token loss. Routed-token
counts are summed over the group after every forward, so strategy hooks (`after_backward`) and
the returned counts see the whole batch, as in one process; gradient hooks that need the
whole batch's routing (UB-SMoE's pseudo-gradients) get sums over the group (group_sums).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.engine.parallel_dims import GroupSums, ParallelDims

IGNORE_INDEX = -100


def shard_batch(batch: dict[str, Tensor], rank: int, size: int) -> tuple[dict[str, Tensor], int]:
    """Rank `rank`'s contiguous share of the rows (sizes differ by at most one) and the whole
    batch's number of trained (shifted) label tokens."""
    labels = batch["labels"]
    n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    rows = torch.arange(labels.shape[0]).tensor_split(size)[rank]
    return {k: v[rows[0]:rows[-1] + 1] if len(rows) else v[:0] for k, v in batch.items()}, n_tokens


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the next-token cross-entropies over the non-ignored labels (as HF's causal LM
    loss, without the mean)."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_buffers(model: torch.nn.Module) -> list[Tensor]:
    return [m.token_counts for m in model.modules() if hasattr(m, "token_counts")
            and isinstance(m.token_counts, Tensor)]


@torch.no_grad()
def sum_new_counts(buffers: list[Tensor], before: list[Tensor]) -> None:
    """Replace each rank's counts since `before` by the group's sum of them (one all_reduce)."""
    import torch.distributed as dist

    if not buffers:
        return
    delta = torch.stack([b - s for b, s in zip(buffers, before)])
    dist.all_reduce(delta)
    for b, s, d in zip(buffers, before, delta):
        b.copy_(s + d)


def group_sums(dims: ParallelDims, expert_parallel=None) -> GroupSums:
    """The sums gradient hooks need to see the whole batch: over this client group's ranks and,
    under expert parallelism, over the expert-parallel group (`expert_parallel.group`)."""
    if dims.ranks == 1:
        return GroupSums()
    return GroupSums(_all_reduced(None), _all_reduced(expert_parallel.group) if expert_parallel else None)


def _all_reduced(group):
    import torch.distributed as dist

    def total(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t
    return total


def group_mean_losses(local: list[float], device) -> list[float]:
    """Per step, the sum over the group's ranks of each rank's share of the batch-mean loss."""
    import torch.distributed as dist

    t = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
