"""Dense updates merged into the frozen base weights (FLoRA, FedEx-LoRA, merge-into-backbone).

A delta is keyed like its LoRA pair (`<module>.lora_gate_up`, `<module>.lora_down`,
`<linear>.lora`) and has the full base weight's shape. The pristine base is kept once, so
setting a delta is `W = W0 + delta` every time: no drift from repeated in-place additions, and a
resumed run rebuilds bitwise the same weights.

Under expert parallelism a block holds only its experts' base weights: the pristine copy is that
slice too and each delta's rows for those experts are added. `ExpertParallel.gathered` swaps in the
all-gathered pristine base while it holds all experts (`gathered_pristine`), so a delta set there
(evaluation, export) applies to the full weights.

Under ZeRO-3 the base weights are partitioned: each is gathered whole, written and partitioned
again (pipeline.model.partitioned; every rank of the group calls this with the same deltas), and the
pristine copy stays on the CPU so that it does not undo ZeRO-3's saving on the device.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock
from pipeline.model.partitioned import gathered, is_partitioned

PRISTINE = "_fedmoe_pristine_base"
EXPERT_PAIRS = {"gate_up_proj": "lora_gate_up", "down_proj": "lora_down"}  # base weight -> pair


def expert_base_keys(model: nn.Module) -> dict[str, tuple[HeteroMoEBlock, str]]:
    """Pair key -> (block, fused base weight name) for the experts' adapted base weights."""
    return {f"{name}.{pair}": (module, base) for name, module in model.named_modules()
            if isinstance(module, HeteroMoEBlock) and module.has_lora
            for base, pair in EXPERT_PAIRS.items()}


def lora_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Pair key -> the frozen base weight that pair adapts."""
    out = {key: getattr(block.experts, base) for key, (block, base) in expert_base_keys(model).items()}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora"] = module.base.weight
    return out


def _local_rows(delta: Tensor, weight: Tensor, block: HeteroMoEBlock | None) -> Tensor:
    """The rows of a full `[E, ...]` expert delta for the experts this rank's `weight` holds."""
    if block is None or delta.shape[0] == weight.shape[0]:
        return delta
    start = block.expert_range[0]
    return delta[start:start + weight.shape[0]]


LowRank = dict[str, list[tuple[float, Tensor, Tensor]]]  # key -> [(c, B, A)]: sum of c * B @ A


@torch.no_grad()
def set_base_delta(model: nn.Module, deltas: dict[str, Tensor], low_rank: LowRank | None = None) -> None:
    """Set every adapted base weight to its pristine value plus `deltas[key]` (zero if absent)
    plus `sum c * B @ A` over `low_rank[key]` (factors as LoRA has them, B [.., out, k] and
    A [.., k, in]; a client's own shift of the base, formed one weight at a time).

    The pristine copy of a weight is taken the first time it gets a delta: until then it has
    never been changed, and methods without deltas keep no copy."""
    weights = lora_base_weights(model)
    low_rank = low_rank or {}
    unknown = sorted((set(deltas) | set(low_rank)) - set(weights))
    if unknown:
        raise ValueError(f"base delta for unknown LoRA pair {unknown[0]!r}")
    pristine = getattr(model, PRISTINE, None)
    if pristine is None:
        if not deltas and not low_rank:
            return  # nothing merged yet: no copy needed
        pristine = {}
        setattr(model, PRISTINE, pristine)
    blocks = expert_base_keys(model)
    for key, w in weights.items():
        if key not in pristine and key not in deltas and key not in low_rank:
            continue  # never merged: nothing to restore (the same keys on every rank)
        with gathered([w], modify=True):  # one weight at a time: ZeRO-3 never holds them all
            if key not in pristine:
                pristine[key] = w.detach().to("cpu" if is_partitioned(w) else w.device, copy=True)
            value = pristine[key].to(w.device)
            if value.shape != w.shape:
                raise RuntimeError(f"{key}: pristine base {tuple(value.shape)} for a weight of "
                                   f"{tuple(w.shape)} (experts gathered without gathered_pristine?)")
            block = blocks.get(key, (None,))[0]
            if key in deltas:
                delta = _local_rows(deltas[key], w, block)
                value = value + delta.to(device=w.device, dtype=value.dtype)
            for c, b, a in low_rank.get(key, ()):
                shift = c * torch.matmul(_local_rows(b, w, block).double(), _local_rows(a, w, block).double())
                value = value + shift.to(device=w.device, dtype=value.dtype)
            w.data.copy_(value)


@contextmanager
def gathered_pristine(model: nn.Module, gather):
    """While the expert-parallel blocks hold all experts: the pristine copies of their base
    weights all-gathered by `gather(local)` (a collective; every rank holds the same keys,
    since outside this context deltas are set on every rank alike). On exit the local slices
    come back, and a copy first taken inside (by one rank, of the full weights) is dropped: the
    local weights it stands for were not changed."""
    pristine = getattr(model, PRISTINE, None)
    keys = [k for k, (blk, _) in expert_base_keys(model).items() if blk.token_exchange is not None]
    saved = {}
    for key in keys:
        if pristine is not None and key in pristine:
            saved[key] = pristine[key]
            pristine[key] = gather(saved[key])
    try:
        yield
    finally:
        pristine = getattr(model, PRISTINE, None)
        for key in keys if pristine is not None else ():
            if key in saved:
                pristine[key] = saved[key]
            else:
                pristine.pop(key, None)


@torch.no_grad()
def pristine_weights(model: nn.Module):
    """(pair key, the adapted base weight before any delta, a float32 CPU copy), one weight at a
    time: this rank's experts under expert parallelism, gathered whole under ZeRO-3."""
    pristine = getattr(model, PRISTINE, None) or {}
    for key, w in lora_base_weights(model).items():
        if key in pristine:
            yield key, pristine[key].detach().float().cpu().clone()
            continue
        with gathered([w]):
            yield key, w.detach().float().cpu().clone()


def base_weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Pair key -> the adapted base weight's whole shape (ZeRO-3 keeps it as `ds_shape`)."""
    return {k: tuple(getattr(w, "ds_shape", w.shape)) for k, w in lora_base_weights(model).items()}
