"""`hetlora`: HetLoRA (ALGORITHMS.md section 4; third-party code, the paper's gamma/lambda
were not recovered, so both defaults are ours).

Clients start from the global rank-r_max LoRA truncated to their rank; the local loss adds
lambda * ||B_tail|| * ||A_tail|| over the components from ceil(gamma r_c) on (0-based), per
LoRA matrix: per expert for expert LoRA, whose tensors stack one matrix per expert. A client
whose tail norm fell during local training prunes its rank to max(1, floor(gamma * r_c)) for its
next round. The server zero-pads every client to r_max and averages with weights
w_c = ||s_c B_c A_c||_F / sum_j ||s_j B_j A_j||_F.

At gamma = 0.75 a rank-2 client's tail is empty (ceil(1.5) = 2): no penalty, and it never
prunes; ranks 4 and 6 have one tail component, rank 8 two.
"""
from __future__ import annotations

import math

import torch

from pipeline.algorithms.base import ClientPlan, ClientUpdate, register, weighted_average
from pipeline.algorithms.hetero_rank import HeteroRankStrategy, zero_padded_sum
from pipeline.algorithms.options import Option
from pipeline.config import Tier


@register
class HetLoRA(HeteroRankStrategy):
    name = "hetlora"
    option_spec = {**HeteroRankStrategy.option_spec,  # [choice] gamma, lam, prune defaults
                   "gamma": Option(0.75, float, 0.0, 1.0, open_low=True),
                   "lam": Option(1e-3, float, low=0.0), "prune": Option(True, bool)}

    def init_state(self, initial_adapters):
        super().init_state(initial_adapters)
        self.ranks: dict[str, int] = {}  # client id -> self-pruned rank (JSON-able)

    def state_dict(self):
        state = super().state_dict()
        state["meta"]["ranks"] = self.ranks
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ranks = dict(state["meta"].get("ranks", {}))

    def client_rank(self, client_id: int, tier: Tier) -> int:
        return min(tier.lora_rank, self.ranks.get(str(client_id), tier.lora_rank))

    def tail(self, rank: int) -> tuple[int, int]:
        start = max(1, math.ceil(self.options["gamma"] * rank))
        return start, rank

    def tail_norm(self, adapters: dict[str, torch.Tensor], rank: int) -> torch.Tensor:
        """sum over LoRA matrices of ||B_tail||_F ||A_tail||_F; an expert tensor [E, ., .] is E
        matrices, so its term is the sum over experts, not the norms of the whole stack."""
        lo, hi = self.tail(rank)
        total = 0.0
        for _, a, b in self.pairs:
            norms = (torch.linalg.matrix_norm(adapters[b][..., lo:hi])
                     * torch.linalg.matrix_norm(adapters[a][..., lo:hi, :]))
            total = total + norms.sum()
        return total

    def extra_loss(self, model, plan: ClientPlan):
        lo, hi = self.tail(plan.lora_rank)
        if self.options["lam"] == 0 or lo >= hi:
            return None
        params = dict(model.named_parameters())
        return self.options["lam"] * self.tail_norm(params, plan.lora_rank)

    def contribution(self, update: ClientUpdate):
        norm = torch.sqrt(sum((p ** 2).sum() for p in self.products(update).values())).item()
        out = zero_padded_sum(self, update, norm)
        if self.options["prune"]:
            before = self.tail_norm(self.factors_at_rank(self.global_adapters, update.lora_rank), update.lora_rank)
            after = self.tail_norm(update.adapters, update.lora_rank)
            if float(after) < float(before):
                # The pruned rank travels in the sums (one key per client, so its sum is the value):
                # contributions may be computed in another client group's process, and only
                # finalize, which every process runs on the same sums, changes server state.
                rank = max(1, math.floor(self.options["gamma"] * update.lora_rank))
                out[f"prune/{update.client_id}"] = torch.tensor([float(rank)], dtype=torch.float64)
        return out

    def finalize(self, sums) -> dict:
        self.global_adapters = weighted_average(sums, self.global_adapters)
        for key, value in sums.items():
            if key.startswith("prune/"):
                self.ranks[key[len("prune/"):]] = int(value.item())
        return {}
