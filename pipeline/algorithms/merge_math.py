"""Low-rank algebra of the merge-into-backbone methods (FedSmoothLoRA, FRLoRA) on plain tensors.

Factors have the LoRA layout, A [..., k, in] and B [..., out, k]; a leading expert dimension
batches one matrix per expert, so every SVD below is one SVD per expert. Everything is float64.

Which SVD where (ALGORITHMS.md section 5; official code: FedSmoothLoRA `NLG_exp/utils.py`
`matrix_truncated_svd_every_layer`, LoRA-GA's peft fork `tuners/lora/layer.py` `lora_ga_init`):
- `truncated_svd(B, A, r)`: SVD_r of a matrix given as a product of stacked factors (the local
  init W_ga + W_rm, the upload B A - W_ga, the server's weighted mean of uploads). Exact: QR of
  both factors and one SVD of the small core. The official code runs `torch.svd_lowrank(M,
  q=4r, niter=8)` on the dense matrix, which reproduces the exact SVD_r whenever M's rank is at
  most q (the init has rank <= 3r, an upload <= 2r, the server mean <= 4r up to four clients a
  round); with more clients a round this is the exact SVD_r the randomised one approximates
  [choice]. No random draw, so resumed and distributed runs need no RNG state for it.
- `lora_ga_factors(G, r)`: LoRA-GA on a dense full-weight gradient: the randomised SVD
  (`randomized_svd`, torch's algorithm with a seeded generator) at q = min(4r, m, n) and
  niter = 4, as `lora_ga_init` calls `torch.svd_lowrank`.
- `pissa_factors(W, r, s)`: FRLoRA's PiSSA init, a full SVD of the pretrained weight
  (FRLoRA `fed_global.py` `ours_init`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

GA_NITER = 4  # lora_ga_init: torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)


def stack(*terms: tuple[float, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """sum_i c_i B_i A_i as one pair of float64 factors: A = [A_1; A_2; ...], B = [c_1 B_1, ...]."""
    a = torch.cat([t[2].double() for t in terms], dim=-2)
    b = torch.cat([c * t.double() for c, t, _ in terms], dim=-1)
    return a, b


def truncated_svd(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A_r, B_r) with B_r A_r = SVD_r(B A): B_r = U_r diag(S_r), A_r = V_r^T, as the official
    `matrix_truncated_svd_every_layer` returns them; zero-padded to `rank` components when B A
    has fewer. B A is never formed: B = Q_b R_b, A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    k = min(rank, s.shape[-1])
    b_r = (qb @ u[..., :, :k]) * s[..., None, :k]
    a_r = vh[..., :k, :] @ qa.mT
    return _pad(a_r, b_r, rank)


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    pad = rank - a.shape[-2]
    if pad > 0:
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], pad, a.shape[-1])], dim=-2)
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
    return a, b


def product(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(b.double(), a.double())


def randomized_svd(m: Tensor, q: int, niter: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """U [.., rows, q], S [.., q], V [.., cols, q] of `m` [.., rows, cols]: torch.svd_lowrank's
    algorithm (torch/_lowrank.py: Halko et al. 2009, Algorithm 4.4, with `niter` subspace
    iterations) in float64, its Gaussian test matrix drawn from `generator` instead of the global
    RNG. As torch does for a batch, one test matrix serves every expert of `m`."""
    m = m.double()
    transposed = m.shape[-2] < m.shape[-1]
    if transposed:
        m = m.mT
    r = torch.randn(m.shape[-1], q, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(m @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(m.mT @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ m, full_matrices=False)
    u, v = basis @ u, vh.mT
    return (v, s, u) if transposed else (u, s, v)


def lora_ga_factors(grad: Tensor, rank: int, gamma: float, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor]:
    """LoRA-GA's init from a full-weight gradient `grad` [.., m, n] (m output features), as the
    peft fork's `lora_ga_init` with direction "ArB2r" and scale "stable": B = U[:, r:2r] and
    A = V[:, :r]^T, both times m^(1/4) / sqrt(gamma). Returns (A, B) in float64."""
    m, n = grad.shape[-2:]
    q = min(4 * rank, m, n)
    if q < 2 * rank:
        raise ValueError(f"LoRA-GA needs 2 r <= min(out, in): r = {rank} for a {m} x {n} weight")
    u, _, v = randomized_svd(grad, q, GA_NITER, generator)
    c = m ** 0.25 / math.sqrt(gamma)
    return v[..., :, :rank].mT * c, u[..., :, rank:2 * rank] * c


def pissa_factors(weight: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """PiSSA: W's top-r singular triplets split evenly, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
    so that s B A is W's best rank-r part (FRLoRA `ours_init`). Returns (A, B) in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = torch.sqrt(s[..., :rank] / scale)
    return root[..., :, None] * vh[..., :rank, :], u[..., :, :rank] * root[..., None, :]


def zero_matrices(m: Tensor) -> Tensor:
    """[..] bool: which matrices of `m` [.., rows, cols] are exactly zero."""
    return m.flatten(-2).abs().amax(-1) == 0
