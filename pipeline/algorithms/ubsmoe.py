"""`ubsmoe`: UB-SMoE = Dynamic Modulated Routing (DMR) + Universal Pseudo-Gradient (PG).

ALGORITHMS.md section 3. Client: router affinities s, candidate set T = top-N_p of s, a
learnable per-layer shift phi added inside T, softmax, top-K_c (the block does this when the
model carries `phi`); loss = LM + range penalty on phi; after each backward, every expert's
LoRA gets rho_c * pi_i times the routing-mass-weighted gradient of the active experts (pi_i:
the routing mass its tokens left unserved). Server: adapters averaged (FedAvg or expert-wise),
then the utilisation estimate u, the target u* = K_bar / M, phi_raw = tanh(u*/u - 1) and the
momentum update phi = zeta * mean_c(phi_c) + (1 - zeta) * phi_raw, broadcast next round.

Switches (all documented as ours where ALGORITHMS.md tags them [choice]):
dmr, pg, reg (on/off), rho (sparsity | inverse), aggregation (fedavg | expert-wise),
pg_scope (all | inactive), pg_space (weight | factors), n_candidates (default 2 K_max),
phi_min/phi_max, lam, zeta.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from pipeline.algorithms import routing_math as rm
from pipeline.algorithms.base import (ClientPlan, ClientUpdate, Strategy, register,
                                      weighted_average, weighted_sum_contribution)
from pipeline.algorithms.options import Option
from pipeline.errors import ConfigError
from pipeline.model.adapters import is_expert_adapter, moe_blocks
from pipeline.model.moe_block import EXPERT_LORA_NAMES

LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> int:
    match = LAYER.search(name)
    if not match:
        raise ValueError(f"{name}: no layer index in adapter name")
    return int(match.group(1))


def is_phi(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "phi"


@register
class UBSMoE(Strategy):
    name = "ubsmoe"
    expert_sharded = True  # adapters per key (fedavg) or per expert (expert-wise); the rest is [L, E]
    option_spec = {
        "dmr": Option(True, bool), "pg": Option(True, bool), "reg": Option(True, bool),
        "rho": Option("sparsity", ("sparsity", "inverse")),
        "aggregation": Option("fedavg", ("fedavg", "expert-wise")),
        "pg_scope": Option("all", ("all", "inactive")), "pg_space": Option("weight", ("weight", "factors")),
        "n_candidates": Option(None, int, low=1, nullable=True),  # None: 2 K_max
        "phi_min": Option(-1.0, float), "phi_max": Option(1.0, float),
        "lam": Option(1e-2, float, low=0.0), "zeta": Option(0.9, float, 0.0, 1.0),
        "eps": Option(1e-6, float, low=0.0, open_low=True),
    }

    def __init__(self, options, model, tiers):
        super().__init__(options, model, tiers)
        o = self.options
        if not o["phi_min"] < o["phi_max"]:
            raise ConfigError(f"algorithm.options.phi_min: must be below phi_max={o['phi_max']}, "
                              f"got {o['phi_min']}")
        if model is not None:
            n_p = 2 * model.k_max if o["n_candidates"] is None else o["n_candidates"]
            if not model.k_max <= n_p <= model.num_experts:
                raise ConfigError(f"algorithm.options.n_candidates: must be in [K_max={model.k_max}, "
                                  f"{model.num_experts}], got {n_p}")
            o["n_candidates"] = min(n_p, model.num_experts)
        self.model_features = {"routing_modulation": o["n_candidates"] if o["dmr"] else None,
                               "record_routing": o["pg"]}
        self.utilisation: Tensor | None = None
        self._rho = 0.0

    # --- state ---------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        if self.utilisation is not None:
            state["tensors"]["utilisation"] = self.utilisation
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.utilisation = state["tensors"].get("utilisation")

    # --- client hooks ----------------------------------------------------------------------
    def extra_loss(self, model, plan: ClientPlan):
        if not (self.options["dmr"] and self.options["reg"]):
            return None
        o = self.options
        phis = [p for n, p in model.named_parameters() if is_phi(n)]
        return sum(rm.range_penalty(p, o["phi_min"], o["phi_max"], o["lam"]) for p in phis)

    def configure_model(self, model, plan: ClientPlan | None) -> None:
        """PG runs as gradient hooks on each layer's expert-LoRA tensors: they see the whole
        layer's gradient before DeepSpeed takes it (ZeRO 1/2 move gradients out of `p.grad`
        during backward), so it works at every ZeRO stage. In weight space the block's
        projections also hook their output gradient, where the layer's weighted weight gradient
        is formed and mapped into the factors; the tensor hooks then add the result."""
        if not self.options["pg"]:
            return
        self._rho = rm.rho(plan.top_k, self.model.num_experts, self.options["rho"]) if plan else 0.0
        weight_space = self.options["pg_space"] == "weight"
        observer = self._projection_observer() if weight_space else None
        # Marked per tensor, not per model: tensors swapped in after the first call (the
        # all-gathered copies of ExpertParallel.gathered) get their own hook, and the tensors that
        # train keep exactly one, on every rank alike (the hook's sums are collectives).
        for block in moe_blocks(model):
            if weight_space:
                block.projection_observer = observer
                if not hasattr(block, "pg_pending"):
                    block.pg_pending = {}
            for name in EXPERT_LORA_NAMES:
                p = getattr(block, name, None)
                if p is not None and not getattr(p, "_fedmoe_pg_hook", False):
                    p.register_hook(self._pending_hook(block, name) if weight_space
                                    else self._pseudo_gradient_hook(block))
                    p._fedmoe_pg_hook = True

    def _statistics(self, block) -> rm.RoutingStats | None:
        """The block's routing statistics of its last forward, summed over the client group
        once per forward (one collective for all of the layer's hooks)."""
        routing = block.last_routing
        if routing is None:
            return None
        cached = getattr(block, "pg_statistics", None)
        if cached is None or cached[0] is not routing:
            stats = rm.routing_statistics(routing.indices, routing.probs).summed(self.group_sums.over_group)
            block.pg_statistics = cached = (routing, stats)
        return cached[1]

    def _pseudo_gradient_hook(self, block):
        """Factor space. Inside a client group of several ranks the block's routing is this
        rank's tokens and, under expert parallelism, `grad` holds only its experts: the
        statistics are summed over the group and the weighted gradient over the expert-parallel
        group, by the sums the run handed this strategy (`group_sums`, from the engine; None in
        one process), so the step is the single-process step on the whole batch."""
        def hook(grad: Tensor) -> Tensor:
            if self._rho == 0.0 or block.last_routing is None:
                return grad
            sliced = grad.shape[0] < block.num_experts  # expert parallel: this rank's experts only
            add = rm.pseudo_gradients_from(
                grad, self._statistics(block), self._rho, self.options["pg_scope"],
                first_expert=block.expert_range[0] if sliced else 0,
                sum_experts=self.group_sums.over_experts if sliced else None)
            return grad + add
        return hook

    def _projection_observer(self):
        """The blocks' `projection_observer`: a plain closure, which a deep copy of the model
        shares (a bound method would deep-copy this strategy with it)."""
        def observe(block, proj: str, xs: Tensor, out: Tensor, offsets: Tensor) -> None:
            if self._rho != 0.0 and block.last_routing is not None:
                out.register_hook(lambda g: self._weight_space(block, proj, xs, g, offsets))
        return observe

    def _weight_space(self, block, proj: str, xs: Tensor, grad_out: Tensor, offsets: Tensor) -> None:
        """Weight space, in the projection's backward: sum_j w_j dL/dW_j over this rank's routed
        rows (one GEMM; summed over the expert-parallel group when this rank holds only some
        experts, as its rows then hold only theirs), mapped into this rank's experts' factors
        and left for the factors' own hooks; the [out, in] sum is freed on return. Linear in
        the rank's gradient, so the group's usual gradient reduction gives the whole batch's."""
        stats = self._statistics(block)
        sliced = offsets.numel() < block.num_experts
        first = block.expert_range[0] if sliced else 0
        mass = stats.mass[first:first + offsets.numel()]
        weighted = rm.mass_weighted_weight_gradient(grad_out, xs, offsets, mass)
        if sliced and self.group_sums.over_experts is not None:
            weighted = self.group_sums.over_experts(weighted)
        a, b = block._lora_factors(proj)
        add_a, add_b = rm.weight_space_pseudo_gradients(
            weighted, stats, a.detach(), b.detach(), block.scale, self._rho,
            self.options["pg_scope"], first_expert=first)
        block.pg_pending[f"lora_{proj}_A"] = add_a
        block.pg_pending[f"lora_{proj}_B"] = add_b

    @staticmethod
    def _pending_hook(block, name: str):
        """Adds the weight-space pseudo-gradient its projection's hook left (active rank only)."""
        def hook(grad: Tensor) -> Tensor:
            add = block.pg_pending.pop(name, None)
            if add is None:
                return grad
            out = grad.clone()
            rank = add.shape[1] if name.endswith("_A") else add.shape[2]
            (out[:, :rank] if name.endswith("_A") else out[..., :rank]).add_(add.to(grad.dtype))
            return out
        return hook

    # --- aggregation ----------------------------------------------------------------------
    def contribution(self, update: ClientUpdate):
        n = float(update.n_samples)
        if self.options["aggregation"] == "fedavg":
            out = weighted_sum_contribution(update.adapters, n)
        else:  # expert-wise: expert j of client c weighted by its routed-token count a_{c,j}
            out = weighted_sum_contribution({k: v for k, v in update.adapters.items() if not is_expert_adapter(k)}, n)
            counts = update.expert_token_counts.double()
            for k, v in update.adapters.items():
                if is_expert_adapter(k):
                    c = self.expert_rows(counts[layer_of(k)])
                    out[f"ew/{k}"] = v.double() * c.view(-1, *([1] * (v.dim() - 1)))
            out["ew_counts"] = counts
        tokens = max(update.tokens, 1)
        out["u_num"] = n * update.expert_token_counts.double() / tokens
        out["k_num"] = torch.tensor([n * update.top_k], dtype=torch.float64)
        return out

    def finalize(self, sums) -> dict:
        previous = self.global_adapters
        if self.options["aggregation"] == "fedavg":
            new = weighted_average(sums, previous)
        else:
            new = weighted_average(sums, {k: v for k, v in previous.items() if not is_expert_adapter(k)})
            counts = sums["ew_counts"]
            for k, v in previous.items():
                if is_expert_adapter(k):
                    c = self.expert_rows(counts[layer_of(k)]).view(-1, *([1] * (v.dim() - 1)))
                    # An expert no client routed a token to keeps its previous value.
                    new[k] = torch.where(c > 0, sums[f"ew/{k}"] / c.clamp_min(1e-12), v.double()).to(v.dtype)
            new = {k: new[k] for k in previous}
        total = sums["weight"].item()
        self.utilisation = (sums["u_num"] / total).float()
        if self.options["dmr"]:
            u_star = sums["k_num"].item() / total / self.model.num_experts
            raw = rm.phi_raw(self.utilisation.double(), u_star, self.options["eps"])
            for k in new:
                if is_phi(k):
                    mean_c = new[k].double()  # the n_c-weighted mean of the clients' phi
                    new[k] = rm.momentum_phi(mean_c, raw[layer_of(k)], self.options["zeta"]).float()
        self.global_adapters = new
        return {"utilisation": [[round(u, 6) for u in layer] for layer in self.utilisation.tolist()]}
