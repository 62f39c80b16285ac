"""`fedavg` (FedIT): the compute-blind reference.

Every client trains the same LoRA at the model's full top-k whatever its tier's budget, and the
server averages adapters with weights n_c / sum n (ALGORITHMS.md section 4, FedIT).
"""
from __future__ import annotations

from pipeline.algorithms.base import (ClientPlan, ClientUpdate, Strategy, register,
                                      weighted_average, weighted_sum_contribution)
from pipeline.config import Tier


@register
class FedAvg(Strategy):
    name = "fedavg"
    expert_sharded = True  # a per-key weighted average

    def plan(self, client_id: int, round_: int, tier: Tier, seed: int) -> ClientPlan:
        plan = super().plan(client_id, round_, tier, seed)
        plan.top_k = self.model.k_max  # ignores the tier's budget on purpose
        return plan

    def contribution(self, update: ClientUpdate):
        return weighted_sum_contribution(update.adapters, update.n_samples)

    def finalize(self, sums) -> None:
        self.global_adapters = weighted_average(sums, self.global_adapters)
