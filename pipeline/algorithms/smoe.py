"""`smoe`: naive heterogeneous sparse MoE (ALGORITHMS.md section 2).

Each client computes the top-K_c experts of the router softmax for its tier and trains expert
LoRA; the server averages adapters with FedAvg weights n_c / sum n (FedAvg's aggregation). It
shows the two failures UB-SMoE names: utilisation imbalance and no signal for experts a client
never activates.
"""
from __future__ import annotations

from pipeline.algorithms.base import ClientPlan, Strategy, register
from pipeline.algorithms.fedavg import FedAvg
from pipeline.config import Tier


@register
class NaiveSMoE(FedAvg):
    name = "smoe"

    def plan(self, client_id: int, round_: int, tier: Tier, seed: int) -> ClientPlan:
        return Strategy.plan(self, client_id, round_, tier, seed)  # the tier's own top-k
