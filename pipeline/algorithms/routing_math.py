"""Routing-side rules of UB-SMoE and the loss-free balancing baseline, on plain tensors.

Kept apart from the strategies so each rule is tested against a hand computation
(ALGORITHMS.md section 3; tags there say which parts are the paper's and which are ours).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


def phi_raw(u: Tensor, u_star: float, eps: float = 1e-6) -> Tensor:
    """tanh(u*/u - 1): overused experts get a negative shift, underused ones a positive shift."""
    return torch.tanh(u_star / (u + eps) - 1.0)


def momentum_phi(phi_clients_mean: Tensor, raw: Tensor, zeta: float) -> Tensor:
    """phi = zeta * mean_c(phi_c) + (1 - zeta) * phi_raw."""
    return zeta * phi_clients_mean + (1.0 - zeta) * raw


def range_penalty(phi: Tensor, low: float, high: float, lam: float) -> Tensor:
    """lambda * (||relu(low - phi)||^2 + ||relu(phi - high)||^2)."""
    return lam * (torch.relu(low - phi).pow(2).sum() + torch.relu(phi - high).pow(2).sum())


def rho(top_k: int, num_experts: int, kind: str = "sparsity") -> float:
    """Client sparsity factor: 1 - K_c/M (default) or M/K_c; grows as K_c shrinks."""
    if kind == "sparsity":
        return 1.0 - top_k / num_experts
    if kind == "inverse":
        return num_experts / top_k
    raise ValueError(f"rho: unknown kind {kind!r}")


class RoutingStats(NamedTuple):
    """One layer's routing statistics for pseudo-gradients, float64, additive over token
    shards: summing every rank's gives the whole batch's (pseudo_gradients_from)."""
    mass: Tensor    # [M] w_j = sum over tokens routed to j of p_j(x)
    unused: Tensor  # [M] sum over tokens of p_j(x) * 1[j not in A(x)], pi's numerator
    used: Tensor    # [M] tokens that used j
    tokens: Tensor  # [1] N

    def summed(self, total: Callable[[Tensor], Tensor] | None) -> "RoutingStats":
        """The statistics summed by `total` (one reduction of all four; None: unchanged)."""
        if total is None:
            return self
        flat = total(torch.cat(tuple(self)))
        m = self.mass.numel()
        return RoutingStats(flat[:m], flat[m:2 * m], flat[2 * m:3 * m], flat[3 * m:])


def routing_statistics(indices: Tensor, probs: Tensor) -> RoutingStats:
    """indices [N, k] the experts each token used; probs [N, M] the (modulated) routing softmax."""
    probs = probs.double()
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, indices, True)
    return RoutingStats((probs * chosen).sum(0), (probs * ~chosen).sum(0), chosen.sum(0).double(),
                        torch.tensor([probs.shape[0]], dtype=torch.float64, device=probs.device))


def pseudo_gradients_from(grads: Tensor, stats: RoutingStats, rho_c: float, scope: str = "all",
                          first_expert: int = 0,
                          sum_experts: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Pseudo-gradients for one layer's expert LoRA tensor in factor space (`pg_space: factors`),
    for experts `first_expert + [0, len(grads))`.

    grads [M, ...] true gradients of the experts' copies of one LoRA tensor; `stats` the
    layer's routing statistics (`routing_statistics` of the tokens' experts and the
    (modulated) routing softmax). Returns the tensor to add to `grads`:
        w_j   = sum over tokens routed to j of p_j(x)
        G_bar = sum_j w_j grad_j / sum_j w_j
        pi_i  = mean over tokens of p_i(x) * 1[i not in A(x)]
        add_i = rho_c * pi_i * G_bar
    Every expert receives it (scope "all", the specification's reading); with scope
    "inactive" only experts that no token used.

    Split from the statistics so that a group of ranks computes the whole batch's step: with `stats` summed over
    the ranks' token shards and `sum_experts` summing sum_j w_j grad_j over the ranks that hold
    the layer's other experts (None: `grads` holds them all), each rank's add is the
    single-process add of its gradient; it is linear in the gradient, so the ranks' usual
    gradient reduction then gives the whole batch's.
    """
    if stats.mass.sum() <= 0:
        return torch.zeros_like(grads)
    local = slice(first_expert, first_expert + grads.shape[0])
    flat = grads.reshape(grads.shape[0], -1).double()
    numerator = (stats.mass[local, None] * flat).sum(0)
    if sum_experts is not None:
        numerator = sum_experts(numerator)
    g_bar = numerator / stats.mass.sum()
    add = rho_c * unserved_mass(stats, scope)[local, None] * g_bar[None, :]
    return add.to(grads.dtype).reshape(grads.shape)


def unserved_mass(stats: RoutingStats, scope: str) -> Tensor:
    """pi [M], float64: every expert's (scope "all") or only the unused experts' ("inactive")."""
    if scope not in ("inactive", "all"):
        raise ValueError(f"pg scope: unknown {scope!r}")
    pi = stats.unused / stats.tokens.clamp_min(1)
    return pi * (stats.used == 0) if scope == "inactive" else pi


def mass_weighted_weight_gradient(grad_out: Tensor, xs: Tensor, offsets: Tensor, mass: Tensor) -> Tensor:
    """sum_j w_j dL/dW_j over the experts of one projection's routed rows, [out, in] in xs's dtype.

    `xs` [S, in] are the projection's input rows grouped by expert (`offsets` [E'] their
    cumulative ends), `grad_out` [S, out] the gradient of its output rows, `mass` [E'] the
    experts' w_j. dL/dW_j is the sum of g x^T over expert j's rows, so the weighted sum is one
    GEMM over all routed rows, taken here as one accumulating GEMM per expert (in a fixed order,
    and without an [S, out] copy of the weighted gradient).
    """
    total = xs.new_zeros(grad_out.shape[1], xs.shape[1])
    start = 0
    for w, end in zip(mass.tolist(), offsets.tolist()):
        if end > start and w != 0.0:
            total.addmm_(grad_out[start:end].T, xs[start:end], alpha=w)
        start = end
    return total


def weight_space_pseudo_gradients(weighted: Tensor, stats: RoutingStats, a: Tensor, b: Tensor,
                                  lora_scale: float, rho_c: float, scope: str = "all",
                                  first_expert: int = 0) -> tuple[Tensor, Tensor]:
    """The weight-space pseudo-gradient mapped into each expert's own LoRA factors.

    weighted [out, in] is sum_j w_j dL/dW_j over every expert of the layer (summed over the
    ranks holding them); a [E', r, in], b [E', out, r] the factors of experts
    `first_expert + [0, E')` at the active rank. With G_W = weighted / sum_j w_j, expert i's
    pseudo weight gradient is rho_c pi_i G_W, and by the chain rule through W_i = W0_i + s B_i A_i
        add_a_i = s rho_c pi_i B_i^T G_W,   add_b_i = s rho_c pi_i G_W A_i^T.
    Returns (add_a, add_b) in the factors' shapes and dtype.
    """
    total = stats.mass.sum()
    if total <= 0:
        return torch.zeros_like(a), torch.zeros_like(b)
    g_w = (weighted.double() / total).to(a.dtype)
    local = slice(first_expert, first_expert + a.shape[0])
    coef = (lora_scale * rho_c * unserved_mass(stats, scope)[local]).to(a.dtype)[:, None, None]
    add_a = torch.matmul(b.transpose(1, 2), g_w) * coef
    add_b = torch.matmul(g_w, a.transpose(1, 2)) * coef
    return add_a, add_b


def loss_free_bias_update(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """DeepSeek-style loss-free balancing: b_i += u * sign(mean_load - load_i), per layer."""
    return bias + rate * torch.sign(load.mean(-1, keepdim=True) - load)
