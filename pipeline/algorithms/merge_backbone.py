"""Shared state of the merge-into-backbone family (ALGORITHMS.md section 5): FRLoRA, FedSmoothLoRA.

Both train a LoRA at every client's tier top-k (the sparse setting, as `smoe`: a low tier still
activates fewer experts) and full rank, merge the server's update into the frozen base each
round (`self.delta`, applied as pristine base + delta by pipeline/model/base_delta.py) and give
clients a fresh LoRA next round. Every rule is per LoRA pair, and for expert LoRA per expert (one
SVD per expert), so these methods aggregate by expert shard: under expert parallelism a rank
keeps, computes and merges only its experts' rows (`expert_sharded`), deltas included.
"""
from __future__ import annotations

from torch import Tensor

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms import merge_math as mm
from pipeline.algorithms.delta_state import DeltaStrategy
from pipeline.model.adapters import is_expert_adapter


class MergeStrategy(DeltaStrategy):
    expert_sharded = True

    @property
    def scale(self) -> float:
        """s = alpha / r: every client trains at the full rank (the model's LoRA scale)."""
        return lm.scale(self.model.lora_alpha, self.model.lora_rank)

    def shard_experts(self, start: int, stop: int) -> None:
        super().shard_experts(start, stop)
        self.delta = {k: v[start:stop].clone() if _is_expert_pair(k) else v for k, v in self.delta.items()}

    def merge(self, key: str, *terms: tuple[float, Tensor, Tensor]) -> None:
        """delta[key] += s * sum c B A over the terms (c, A, B): float64, kept in float32."""
        value = sum(c * mm.product(a, b) for c, a, b in terms)
        value = (self.scale * value).float()
        self.delta[key] = self.delta[key] + value if key in self.delta else value


def _is_expert_pair(key: str) -> bool:
    return is_expert_adapter(key + "_A")
