"""ZeRO stage 3 on the engine side: the MoE block as a leaf module, adapters loaded exactly.

At stage 3 DeepSpeed partitions every parameter at `deepspeed.initialize` and gathers a
module's own parameters in a hook before its forward. `HeteroMoEBlock` reads its fused expert
tensors (and router, LoRA, `phi`) inside its own loop over experts, through autograd Functions
rather than submodule calls, so it is marked a leaf: all its parameters are gathered once on
entry (`deepspeed.utils.set_z3_leaf_modules`). Its buffers (`token_counts`) and attributes
(`top_k`, `active_rank`, `selection_bias`) are not partitioned.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pipeline.model.partitioned import gathered


def mark_leaf_modules(model: nn.Module) -> None:
    """Before `deepspeed.initialize`, which registers the hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    from pipeline.model.moe_block import HeteroMoEBlock

    set_z3_leaf_modules(model, [HeteroMoEBlock])


@torch.no_grad()
def load_full(params: dict[str, nn.Parameter], adapters: dict[str, Tensor]) -> None:
    """Full adapter tensors into partitioned parameters: the model's copy (the partition that
    forward gathers) through `GatheredParameters`, then the optimizer's fp32 master partition,
    which is a separate tensor in bf16 (and which the next step would otherwise restore)."""
    from deepspeed.utils import safe_set_local_fp32_param

    with gathered(params.values(), modify=True):
        for name, p in params.items():
            p.data.copy_(adapters[name].to(p.dtype))
    for name, p in params.items():
        safe_set_local_fp32_param(p, local_partition(p, adapters[name].float()))


def local_partition(p: nn.Parameter, full: Tensor) -> Tensor:
    """This rank's slice of `full` as ZeRO-3 partitions `p`: equal slices, the last one padded.

    `safe_set_full_fp32_param` would do this, but DeepSpeed 0.19.8's stage-3 version
    (runtime/zero/stage3.py, set_full_hp_param) reads past the tensor's end on the last rank
    when the partitions are padded ("start (86) + length (43) exceeds dimension size (128)").
    """
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    rank = dist.get_rank(group=p.ds_process_group)
    flat = full.flatten()
    flat = torch.cat([flat, flat.new_zeros(size * dist.get_world_size(group=p.ds_process_group) - flat.numel())])
    return flat[rank * size:(rank + 1) * size]


def add_extra_loss_gradient(params: dict[str, nn.Parameter], extra_loss, model: nn.Module) -> None:
    """After the engine's backward, before its step: add the gradient of `extra_loss(model)`
    (a penalty on the adapters, e.g. ubsmoe's or hetlora's) to the reduced gradient partitions.

    Such a loss reads adapters between forward passes, where ZeRO-3 holds only partitions, and
    its backward may need their values after they are released; so it is computed and
    differentiated on the gathered adapters. Every rank adds the same gradient once, as the
    group's average of identical per-rank gradients would be at ZeRO 0-2.
    """
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    names = list(params)
    with gathered(params.values()):
        extra = extra_loss(model)
        if extra is None:
            return
        grads = torch.autograd.grad(extra, [params[n] for n in names], allow_unused=True)
    for name, grad in zip(names, grads):
        if grad is not None:
            p = params[name]
            safe_set_local_grad(p, safe_get_local_grad(p) + local_partition(p, grad.float()))


_LEAF_HOOK_CALLS = ("should_refresh_expected_hook_count", "reenter_backward_if_needed",
                    "reduce_ready_partitions_and_remove_grads", "update_hook_state_and_maybe_run_epilogue")


@contextmanager
def silenced_leaf_gradient_hooks(optimizer):
    """ZeRO-3 reduces a leaf module's (HeteroMoEBlock's) parameter gradients in a full backward
    hook on the module, which fires in any backward through it, also one that computes no
    parameter gradient (the calibration gradient, pipeline/engine/calibration.py): it would queue
    the block's parameters for a reduction that the next training step then finds twice. Inside,
    the hook's calls into the optimizer do nothing (instance attributes shadowing its methods);
    on exit the methods are back and the zero gradients the hook left are dropped. Without
    ZeRO-3 leaf modules it does nothing."""
    leaves = getattr(optimizer, "leaf_parameters", None)
    if not leaves:
        yield
        return
    for name in _LEAF_HOOK_CALLS:
        setattr(optimizer, name, lambda *args, **kwargs: False)
    try:
        yield
    finally:
        for name in _LEAF_HOOK_CALLS:
            delattr(optimizer, name)
        for params in leaves.values():
            for p in params:
                p.grad = None
