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
  niter = 4, as `lora_ga_init` calls `torch.svd_lowrank`, with pinned signs (`canonical_signs`).
Both zero the components of singular values at rounding level (`significant`).
- `pissa_factors(W, r, s)`: FRLoRA's PiSSA init, a full SVD of the pretrained weight
  (FRLoRA `fed_global.py` `ours_init`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

GA_NITER = 4  # lora_ga_init: torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
# Singular values at most this fraction of the largest are rounding noise (an fp32 gradient's
# null directions measured at ~1e-8 of it): their vectors are arbitrary, so they are zeroed.
NULL_TOL = 1e-6


def significant(s: Tensor) -> Tensor:
    """Which singular values [.., k] (descending) carry signal: above NULL_TOL of the largest.

    An expert that few calibration tokens reached has a gradient of low rank, and so has every
    low-rank sum below when its rank is under r; the singular vectors beyond that rank are
    whatever rounding made them, and a gradient summed over two ranks instead of one picks
    others. Zeroing them keeps every factor a continuous function of its input [choice: the
    official code, on dense models with full-rank gradients, takes them as they come]."""
    return s > NULL_TOL * s[..., :1]


def stack(*terms: tuple[float, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """sum_i c_i B_i A_i as one pair of float64 factors: A = [A_1; A_2; ...], B = [c_1 B_1, ...]."""
    a = torch.cat([t[2].double() for t in terms], dim=-2)
    b = torch.cat([c * t.double() for c, t, _ in terms], dim=-1)
    return a, b


def canonical_signs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Each singular pair (u_i, v_i) flipped so that v_i's largest-magnitude entry is positive.

    An SVD fixes u_i and v_i only up to a common sign, which LAPACK picks from rounding-level
    details: a gradient summed over two ranks instead of one can flip it. LoRA-GA pairs B's
    columns with A's rows from *different* triplets (U[:, r:2r] with V[:, :r]), so a flip changes
    W_ga and the training that follows; pinned signs make the init a continuous function of the
    gradient [choice: the official code takes whatever signs torch returns]."""
    index = v.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(v, -2, index))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, v * sign


def truncated_svd(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A_r, B_r) with B_r A_r = SVD_r(B A): B_r = U_r diag(S_r), A_r = V_r^T, as the official
    `matrix_truncated_svd_every_layer` returns them; zero-padded to `rank` components when B A
    has fewer. B A is never formed: B = Q_b R_b, A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    k = min(rank, s.shape[-1])
    u, v = canonical_signs(qb @ u[..., :, :k], qa @ vh[..., :k, :].mT)
    keep = significant(s)[..., None, :k]
    return _pad((v * keep).mT, u * s[..., None, :k] * keep, rank)


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


def canonical_randomized_svd(m: Tensor, q: int, niter: int, generator: torch.Generator):
    """`randomized_svd` with `canonical_signs`."""
    u, s, v = randomized_svd(m, q, niter, generator)
    u, v = canonical_signs(u, v)
    return u, s, v


def lora_ga_factors(grad: Tensor, rank: int, gamma: float, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor]:
    """LoRA-GA's init from a full-weight gradient `grad` [.., m, n] (m output features), as the
    peft fork's `lora_ga_init` with direction "ArB2r" and scale "stable": B = U[:, r:2r] and
    A = V[:, :r]^T, both times m^(1/4) / sqrt(gamma). Returns (A, B) in float64."""
    m, n = grad.shape[-2:]
    q = min(4 * rank, m, n)
    if q < 2 * rank:
        raise ValueError(f"LoRA-GA needs 2 r <= min(out, in): r = {rank} for a {m} x {n} weight")
    u, s, v = canonical_randomized_svd(grad, q, GA_NITER, generator)
    c = m ** 0.25 / math.sqrt(gamma)
    keep = significant(s)[..., None, :]  # an all-zero gradient keeps nothing
    return (v[..., :, :rank] * keep[..., :rank]).mT * c, u[..., :, rank:2 * rank] * keep[..., rank:2 * rank] * c


def pissa_factors(weight: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """PiSSA: W's top-r singular triplets split evenly, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
    so that s B A is W's best rank-r part (FRLoRA `ours_init`). Returns (A, B) in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = torch.sqrt(s[..., :rank] / scale)
    return root[..., :, None] * vh[..., :rank, :], u[..., :, :rank] * root[..., None, :]
