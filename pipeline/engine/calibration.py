"""The full-weight gradient of a client's loss on a calibration sample (FedSmoothLoRA's LoRA-GA).

For every LoRA target the gradient of its frozen base weight: attention projections `[out, in]`
and each expert's fused gate/up and down weights `[E, out, in]` (this rank's experts under
expert parallelism). It is what LoRA-GA's `estimate_gradient` returns (its peft fork,
`utils/lora_ga_utils.py`): the mean over the calibration batches of each batch's mean-token-loss
gradient, with the adapters contributing nothing (B = 0), i.e. the gradient of the plain model
at the current base weights.

dL/dW of `y = W x` is `sum over tokens of (dL/dy)^T x`, so it is formed from the inputs a forward
saw and the output gradients its backward hands to hooks: the frozen weights need no `.grad` of
their own (under ZeRO DeepSpeed owns `.grad`; under ZeRO-3 the weights are partitions). The
backward is `torch.autograd.grad` towards the input embeddings with every parameter frozen, which
touches no parameter's `.grad` and leaves DeepSpeed's optimizer and its gradient buckets alone. An expert's gradient
sums only the (token, expert) pairs routed to it: an expert no calibration token reached gets
exactly zero.

In a client group of several ranks each rank runs its shard of every batch (data_parallel.py);
the attention gradients are then summed over the group and the expert gradients over the ranks
holding the same experts (all of the group without expert parallelism, none when every rank
holds its own experts: the all-to-all already brought it every token routed to them).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.engine import data_parallel as dp
from pipeline.engine.zero3 import silenced_leaf_gradient_hooks
from pipeline.model.base_delta import base_weight_shapes
from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock, _groups
from pipeline.model.setting import ModelSetting


class _Collector:
    """Hooks that add each projection's weight gradient into `sums` (float32, keyed by LoRA pair)."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, Tensor] = {}
        self.handles = []
        self.saved_observers = []
        self.inputs: list[Tensor] = []
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                self.handles.append(module.register_forward_hook(self._linear_hook(f"{name}.lora")))
            elif isinstance(module, HeteroMoEBlock) and module.has_lora:
                self.saved_observers.append((module, module.projection_observer))
                module.projection_observer = self._expert_observer(name)
        embed = model.get_input_embeddings()
        self.handles.append(embed.register_forward_hook(self._embedding_hook))

    def _add(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _embedding_hook(self, module, args, output):
        # The backward's target: every projection lies between it and the loss.
        output = output.detach().requires_grad_()
        self.inputs.append(output)
        return output

    def _linear_hook(self, key: str):
        def hook(module, args, output):
            x = args[0].detach()
            output.register_hook(lambda g: self._add(
                key, g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()))
        return hook

    def _expert_observer(self, name: str):
        def observe(block, proj: str, xs: Tensor, out: Tensor, offsets: Tensor) -> None:
            xs = xs.detach()

            def on_grad(g: Tensor) -> None:
                dw = g.new_zeros(offsets.numel(), g.shape[-1], xs.shape[-1], dtype=torch.float32)
                for e, rows in _groups(offsets):
                    torch.mm(g[rows].float().T, xs[rows].float(), out=dw[e])
                self._add(f"{name}.lora_{proj}", dw)
            out.register_hook(on_grad)
        return observe

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for block, observer in self.saved_observers:
            block.projection_observer = observer


def weight_gradients(engine, setting: ModelSetting, batches: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """LoRA pair key (`...q_proj.lora`, `...mlp.lora_gate_up`) -> the mean gradient over
    `batches` of its base weight, float32 on the CPU, identical on every rank of the group.
    `engine` is a ClientEngine; its adapters are left with B = 0 (the caller loads the next)."""
    model = engine.model
    engine.load_adapters({k: torch.zeros_like(v) for k, v in engine.read_adapters().items()})
    engine.use(setting)
    engine.engine.train()
    device = engine.engine.device
    collector = _Collector(model)
    # No parameter takes part in this backward: ZeRO-3's gradient hooks would otherwise queue
    # the adapters' gradients for a reduction the next training step then finds twice.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    n_batches = 0
    try:
        for batch in batches:
            batch, n_tokens = dp.shard_batch(batch, engine.dp_rank, engine.dp_size)
            labels = batch.pop("labels").to(device)
            collector.inputs.clear()
            # The module itself, not the DeepSpeed engine's forward: that one hooks the outputs'
            # backward into its optimizer (gradient accumulation, ZeRO reduction, and at ZeRO 0 a
            # refusal of any backward but engine.backward). ZeRO-3 gathers in module hooks.
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            loss = dp.token_loss_sum(logits, labels) / max(n_tokens, 1)  # this shard's share of the mean
            with silenced_leaf_gradient_hooks(engine.engine.optimizer):
                torch.autograd.grad(loss, collector.inputs)
            n_batches += 1
    finally:
        collector.close()
        for p in trainable:
            p.requires_grad_(True)
    sums = {k: (v / max(n_batches, 1)).cpu() for k, v in collector.sums.items()}
    for key, shape in base_weight_shapes(model).items():  # a projection no token reached: zero
        sums.setdefault(key, torch.zeros(shape))
    if engine.dp_size > 1:
        _reduce(engine, sums)
    return sums


def _reduce(engine, sums: dict[str, Tensor]) -> None:
    """Sum the ranks' shares: dense keys over the group, expert keys over the ranks holding the
    same experts (every rank holds every key, in the same order)."""
    expert_group = None
    if engine.dims.ep > 1:
        from deepspeed.utils import groups
        expert_group = groups._get_expert_data_parallel_group(f"ep_size_{engine.dims.ep}")
    for key in sorted(sums):  # the same order on every rank
        group = expert_group if key.rsplit(".", 1)[-1] != "lora" else None
        if group is not None and dist.get_world_size(group) == 1:
            continue
        dist.all_reduce(sums[key], group=group)
