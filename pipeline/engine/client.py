"""The client trainer: one DeepSpeed engine per client group, reused for every virtual client.

Per client only the adapters, the optimizer state and the model setting (`use`) change; the
model and the engine are built once. Under ZeRO 1/2 (and bf16) DeepSpeed keeps fp32 master
copies of the trainable tensors, so adapters are written with `safe_set_full_fp32_param` as
well as into `p.data`, and read back with `safe_get_full_fp32_param`.
Under ZeRO-3 `p.data` is only a partition (zero3.py): `p.data` is written through
`GatheredParameters`, and each MoE block is a ZeRO-3 leaf module, so its fused experts are
gathered once per block, not inside its expert loop.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from pipeline.config import DeepSpeedConfig, TrainConfig
from pipeline.engine import data_parallel as dp
from pipeline.engine import expert_parallel as ep
from pipeline.engine import zero3
from pipeline.engine.parallel_dims import ParallelDims
from pipeline.model import (ModelSetting, adapter_parameters, apply_setting, expert_token_counts,
                            is_expert_adapter, reset_expert_token_counts, set_activation_checkpointing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int = 0, world_size: int = 1, local_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int | None = None,
                     backend: str | None = None) -> None:
    """Start this process's torch.distributed world (one per client group) for DeepSpeed."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port()))
    os.environ.pop("OMPI_COMM_WORLD_LOCAL_RANK", None)  # Open MPI's would contradict our ranks
    # The shared-memory comm op costs a 30 s compile on first use and is only a CPU speed-up.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int,
                     bucket_elements: int | None = None) -> dict:
    """The engine's config; `bucket_elements` (all adapter elements of the whole model) sizes
    ZeRO's gradient buckets where `deepspeed.config` does not."""
    # A client's batch is split over the group's ranks (data_parallel.py); these numbers are
    # DeepSpeed's bookkeeping only, since we feed the batches ourselves.
    micro = -(-train.batch_size // world_size)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW: identical to the reference loop
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        with open(ds.config) as fh:
            config.update(json.load(fh))
    zero = config.get("zero_optimization")
    if bucket_elements and isinstance(zero, dict):
        # DeepSpeed's default buckets (5e8 elements) are sized for full fine-tuning: ZeRO 1/2
        # allocate one every step (2 GB at fp32, NaN-filled on CPU under deterministic mode)
        # and ZeRO 3 one per engine (bench/zero_bucket.py). A bucket holding every adapter
        # gradient reduces exactly as the default one does: all in one bucket.
        zero.setdefault("reduce_bucket_size", bucket_elements)
        zero.setdefault("allgather_bucket_size", bucket_elements)
    return config


def check_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int) -> None:
    """DeepSpeed's own parse of the merged config, before the run directory is written:
    otherwise a bad key in `deepspeed.config` surfaces only when the engine starts."""
    if not ds.config:
        return  # the generated config alone is known good
    from deepspeed.runtime.config import DeepSpeedConfig as Parsed

    from pipeline.errors import ConfigError

    config = deepspeed_config(train, ds, world_size)
    # Before torch.distributed starts DeepSpeed sees a world of one rank, and checks
    # train_batch_size = micro batch x accumulation x world: present it one rank's share.
    batch = config.get("train_batch_size")
    if isinstance(batch, int) and world_size > 1:
        if batch % world_size:
            raise ConfigError(f"deepspeed.config: {ds.config}: train_batch_size {batch} is not a multiple "
                              f"of the client group's {world_size} ranks")
        config["train_batch_size"] = batch // world_size
    try:
        Parsed(config)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises Assertion/Type/Validation errors
        lines = [x.strip() for x in str(exc).strip().splitlines()[:3]] or [type(exc).__name__]
        raise ConfigError(f"deepspeed.config: {ds.config}: DeepSpeed refuses it: {'; '.join(lines)}") from None


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16), whose state we reset."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@dataclass
class LocalResult:
    adapters: dict[str, Tensor]
    expert_token_counts: Tensor  # [layers, experts]
    losses: list[float]
    seconds: float


class ClientEngine:
    """Trains the adapters of one model through a DeepSpeed engine, one client at a time.

    The engine spans this process's torch.distributed world (one client group, `dims`): with
    more than one rank it is data-parallel, every rank taking its shard of each batch
    (data_parallel.py). With `dims.ep` > 1 each rank also holds only its share of the experts
    (expert_parallel.py): `load_adapters` takes whole expert tensors (it keeps this rank's rows)
    or this rank's rows; `read_adapters` returns this rank's rows when `sharded_io` is set (the
    method aggregates by expert shard), else all-gathers whole tensors over the expert-parallel
    group.
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig,
                 dims: ParallelDims | None = None):
        import deepspeed
        import torch.distributed as dist

        if dims is None:  # data-parallel over the whole torch world
            dims = ParallelDims(dist.get_world_size() if dist.is_initialized() else 1)
        self.dims = dims
        self.dp_rank = dist.get_rank() if dims.ranks > 1 else 0
        self.train_cfg = train
        self.sharded_io = False
        self.expert_parallel: ep.ExpertParallel | None = None
        # The whole model's count, before expert parallelism shards it: the same on every rank.
        elements = sum(p.numel() for p in adapter_parameters(model).values())
        config = deepspeed_config(train, ds, dims.ranks, bucket_elements=elements)
        if dims.ep_enabled:
            self.expert_parallel = ep.setup(model, dims)
            self.grad_clip = config["gradient_clipping"]
            # ZeRO 1/2 sum the squared gradient norms over the whole group, which counts every
            # expert once: exact. Without ZeRO, DeepSpeed averages the ranks' norms, so the fp32
            # path clips here with the global norm instead (ep.clip_grad_norm).
            self.own_clip = ds.zero_stage == 0 and train.precision == "fp32"
            if self.own_clip:
                config["gradient_clipping"] = 0.0
        self.group_sums = dp.group_sums(dims, self.expert_parallel)
        self.params = adapter_parameters(model)
        groups = list(self.params.values())
        if dims.ep_enabled:  # expert LoRA in its own groups, reduced over the expert-data-parallel group
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
            groups = split_params_into_different_moe_groups_for_optimizer(
                [{"params": groups, "name": "adapters"}])
        optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
        if ds.zero_stage == 3:
            zero3.mark_leaf_modules(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False)
        self.zero_stage = ds.zero_stage
        self.keeps_master_copy = ds.zero_stage > 0 or train.precision == "bf16"

    @property
    def dp_size(self) -> int:
        return self.dims.ranks

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    @property
    def unmapped_masters(self) -> dict[int, Tensor]:
        """fp32 master copies that DeepSpeed's safe_{get,set}_full_fp32_param cannot reach, by
        id of the model parameter. At ZeRO 0 with bf16 DeepSpeed wraps a non-fused optimizer in
        FP16_UnfusedOptimizer, whose masters (`fp32_groups`, parallel to `fp16_groups`) carry
        no `_hp_mapping`: writing only `p.data` there is undone by the next step, so a client
        would silently train from the previous one's adapters."""
        if not hasattr(self, "_unmapped_masters"):
            opt = self.engine.optimizer
            low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
            self._unmapped_masters = ({id(lp): hp for lg, hg in zip(low, high) for lp, hp in zip(lg, hg)}
                                      if isinstance(low, list) and isinstance(high, list) else {})
        return self._unmapped_masters

    def load_adapters(self, adapters: dict[str, Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if self.zero_stage == 3:
            zero3.load_full(self.params, adapters)
            return
        with torch.no_grad():
            for name, p in self.params.items():
                value = adapters[name]
                if self.is_local_experts(name) and value.shape[0] != p.shape[0]:  # whole -> this rank's rows
                    value = self.expert_parallel.local_rows(value)
                p.data.copy_(value.to(p.dtype))
                if id(p) in self.unmapped_masters:
                    self.unmapped_masters[id(p)].copy_(value)
                elif self.keeps_master_copy:
                    safe_set_full_fp32_param(p, value.float())

    def read_adapters(self) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.params.items():
            full = self.unmapped_masters.get(id(p))
            if full is None and self.keeps_master_copy:
                full = safe_get_full_fp32_param(p)
            value = full if full is not None else p.data
            if self.is_local_experts(name) and not self.sharded_io:
                value = self.expert_parallel.gather(value)
            out[name] = value.detach().float().cpu().clone()
        return out

    def is_local_experts(self, name: str) -> bool:
        """The adapter holds only this rank's experts (expert LoRA under expert parallelism)."""
        return self.expert_parallel is not None and is_expert_adapter(name)

    def whole_experts(self):
        """A context in which every block holds all experts (ExpertParallel.gathered), for
        evaluating or exporting on one rank; a no-op without expert parallelism."""
        if self.expert_parallel is None:
            return contextlib.nullcontext()
        return self.expert_parallel.gathered(self.model)

    def reset_optimizer(self) -> None:
        # torch AdamW creates its moments lazily on the first step after the state is cleared.
        _torch_optimizer(self.engine.optimizer).state.clear()

    def use(self, setting: ModelSetting) -> None:
        """Run the model at `setting` (top-k, LoRA rank and scale, routing options) from now on:
        the one place a client's training, an evaluation and the export set them."""
        apply_setting(self.model, setting)

    def set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing per decoder layer from now on (model.setting)."""
        set_activation_checkpointing(self.model, on)

    def train(self, adapters: dict[str, Tensor], setting: ModelSetting,
              batches: Iterable[dict[str, Tensor]],
              extra_loss: Callable[[torch.nn.Module], Tensor | None] | None = None,
              after_backward: Callable[[torch.nn.Module], None] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              checkpointing: bool = False) -> LocalResult:
        """Local training of one client from `adapters`; returns the trained adapters and counts.
        `checkpointing`: recompute each decoder layer in backward (the same gradients, less memory)."""
        start = time.perf_counter()
        self.load_adapters(adapters)
        self.reset_optimizer()
        self.use(setting)
        self.set_checkpointing(checkpointing)
        reset_expert_token_counts(self.model)
        self.engine.train()
        losses = []
        device = self.engine.device
        counts = dp.count_buffers(self.model) if self.dp_size > 1 else []
        for step, batch in enumerate(batches):
            if self.dp_size > 1:
                batch, n_tokens = dp.shard_batch(batch, self.dp_rank, self.dp_size)
                before = [c.clone() for c in counts]
                labels = batch.pop("labels").to(device)
                logits = self.engine(**{k: v.to(device) for k, v in batch.items()}).logits
                dp.sum_new_counts(counts, before)
                loss = dp.token_loss_sum(logits, labels) / max(n_tokens, 1)  # this shard's share
                scaled = loss * self.dp_size  # DeepSpeed divides the gradient sum by dp_size
            else:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = scaled = self.engine(**batch).loss
            if self.zero_stage == 3:
                self.engine.backward(scaled)
                if extra_loss:
                    zero3.add_extra_loss_gradient(self.params, extra_loss, self.model)
            else:
                extra = extra_loss(self.model) if extra_loss else None
                self.engine.backward(scaled + extra if extra is not None else scaled)
            if after_backward:
                after_backward(self.model)
            if self.expert_parallel is not None and self.own_clip and self.grad_clip > 0:
                ep.clip_grad_norm(self.params.values(), self.grad_clip, self.expert_parallel.group)
            self.engine.step()
            losses.append(loss.item())
            if on_step:
                on_step(step + 1, losses[-1])
        if self.dp_size > 1:
            losses = dp.group_mean_losses(losses, device)  # the whole batch's mean, every rank
        return LocalResult(self.read_adapters(), expert_token_counts(self.model).clone(), losses,
                           time.perf_counter() - start)
