"""Strategies over LoRA pairs that merge server updates into the frozen base.

FLoRA and FedEx-LoRA (heterogeneous rank) and the merge-into-backbone family keep the merged
updates in `self.delta` (keyed by LoRA pair, applied as pristine base + delta by
pipeline/model/base_delta.py) and checkpoint it beside the adapters.
"""
from __future__ import annotations

from torch import Tensor

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.base import Strategy


class DeltaStrategy(Strategy):
    tensor_state = ("delta",)

    def init_state(self, initial_adapters: dict[str, Tensor]) -> None:
        super().init_state(initial_adapters)
        self.pairs = lm.lora_pairs(initial_adapters)
        if len(self.pairs) * 2 != len(initial_adapters):
            raise ValueError(f"{self.name}: every adapter tensor must belong to a LoRA pair")
        self.delta: dict[str, Tensor] = {}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.pairs = lm.lora_pairs(self.global_adapters)

    def base_delta(self) -> dict[str, Tensor]:
        return self.delta
