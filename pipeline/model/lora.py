"""LoRALinear: a frozen `nn.Linear` plus a rank-r update, `base(x) + s * B(A(x))`.

peft's `LoraLayer` would do for attention alone, but our adapters must share one naming scheme,
one init and one active-rank switch with the expert LoRA of `HeteroMoEBlock`, and be plain
parameters that the federated code reads and writes by name; peft's export format is kept
written and read by pipeline.model.peft_format.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScaledLoRA:
    """The LoRA scale of LoRALinear and HeteroMoEBlock: `lora_alpha / active_rank`, or
    `scale_override` when set (a rank-independent scale, set_lora_scale)."""

    lora_alpha: float
    active_rank: int
    scale_override: float | None

    @property
    def scale(self) -> float:
        if self.scale_override is not None:
            return self.scale_override
        return self.lora_alpha / self.active_rank


class LoRALinear(ScaledLoRA, nn.Module):
    """`lora_A [r, in]`, `lora_B [out, r]`; the first `active_rank` ranks are used, scale
    alpha/active_rank (or `scale_override` when set)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.active_rank = self.rank
        self.lora_alpha = float(alpha)
        self.scale_override: float | None = None  # a rank-independent scale (set_lora_scale)
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """peft's init: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(in)); B = 0."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.lora_B.zero_()

    def factors(self) -> tuple[Tensor, Tensor]:
        r = self.active_rank
        return self.lora_A[:r], self.lora_B[:, :r]

    def delta_weight(self) -> Tensor:
        """s * B @ A, [out, in] (for merging)."""
        a, b = self.factors()
        return self.scale * (b @ a)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        return self.base(x) + F.linear(F.linear(x, a) * self.scale, b)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, active_rank={self.active_rank}, lora_alpha={self.lora_alpha}"
