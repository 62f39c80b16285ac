"""`smoe`: naive heterogeneous sparse MoE (ALGORITHMS.md section 2).

Each client computes the top-K_c experts of the router softmax for its tier and trains expert
LoRA; the server averages adapters with FedAvg weights n_c / sum n (FedAvg's aggregation). It
shows the two failures UB-SMoE names: utilisation imbalance and no signal for experts a client
never activates.
"""
from __future__ import annotations

from pipeline.algorithms.base import register
from pipeline.algorithms.fedavg import WeightedAverage


@register
class NaiveSMoE(WeightedAverage):
    name = "smoe"  # the base plan: each tier's own top-k
