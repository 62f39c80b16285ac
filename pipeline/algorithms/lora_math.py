"""LoRA-pair algebra for the heterogeneous-rank baselines, on plain tensors.

A pair is (A, B) with A [..., r, in] and B [..., out, r] (expert LoRA has a leading expert
dimension), named `<key>_A` / `<key>_B`. Adapters always keep the full rank r_max; a client of
rank r uses the first r components (`set_lora_rank`) and the rest is zero. The model scales a
rank-r LoRA by s_r (alpha / r, or a constant: `set_lora_scale`), so rules that compare clients
of different ranks work on the scaled factor s_r * B, which makes s_r B A independent of r.
"""
from __future__ import annotations

import torch
from torch import Tensor


def lora_pairs(adapters: dict[str, Tensor]) -> list[tuple[str, str, str]]:
    """(key, A name, B name) for every LoRA pair, in the adapters' order."""
    pairs = []
    for name in adapters:
        if name.endswith("_A") and name[:-1] + "B" in adapters:
            pairs.append((name[:-2], name, name[:-1] + "B"))
    return pairs


def scale(alpha: float, rank: int) -> float:
    return alpha / rank


def product(a: Tensor, b: Tensor) -> Tensor:
    """B @ A, batched over a leading expert dimension if there is one."""
    return torch.matmul(b.double(), a.double())


def truncate(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero the components beyond `rank` (shapes unchanged)."""
    a, b = a.clone(), b.clone()
    a[..., rank:, :] = 0
    b[..., rank:] = 0
    return a, b


def svd_factors(w: Tensor, rank: int, out_rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors of `w` [..., out, in]: B = U_r S_r, A = V_r^T, padded to `out_rank`.

    Deterministic (full SVD, float64), so resumed runs reproduce the same factors bitwise.
    """
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = min(rank, s.shape[-1])
    b = u[..., :, :k] * s[..., None, :k]
    a = vh[..., :k, :]
    pad = out_rank - k
    if pad > 0:
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], pad, a.shape[-1])], dim=-2)
    return a, b


def client_factors(a_global: Tensor, b_scaled: Tensor, rank: int, lora_scale: float) -> tuple[Tensor, Tensor]:
    """A client's rank-`rank` start point, trained at scale `lora_scale`, from global factors
    whose B carries the scale."""
    a, b = truncate(a_global, b_scaled / lora_scale, rank)
    return a.float(), b.float()
