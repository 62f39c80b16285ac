"""`fedavg` (FedIT): the compute-blind reference.

Every client trains the same LoRA at the model's full top-k whatever its tier's budget, and the
server averages adapters with weights n_c / sum n (ALGORITHMS.md section 4, FedIT).
"""
from __future__ import annotations

from pipeline.algorithms.base import (ClientPlan, ClientUpdate, Strategy, register,
                                      weighted_average, weighted_sum_contribution)
from pipeline.config import Tier


class WeightedAverage(Strategy):
    """Adapters averaged with weights n_c / sum n; each client at its plan's top-k."""

    expert_sharded = True  # a per-key weighted average

    def contribution(self, update: ClientUpdate):
        return weighted_sum_contribution(update.adapters, update.n_samples)

    def finalize(self, sums) -> dict:
        self.global_adapters = weighted_average(sums, self.global_adapters)
        return {}


@register
class FedAvg(WeightedAverage):
    name = "fedavg"

    def plan(self, client_id: int, round_: int, tier: Tier) -> ClientPlan:
        plan = super().plan(client_id, round_, tier)
        plan.top_k = self.model.k_max  # ignores the tier's budget on purpose
        return plan
