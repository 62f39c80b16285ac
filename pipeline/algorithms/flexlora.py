"""`flexlora`: FlexLoRA (ALGORITHMS.md section 4, official code).

The server forms W = sum_c p_c s_c B_c A_c per LoRA pair, takes its SVD U S V^T, and gives
client c the truncation A_c = V[:, :r_c]^T, B_c = U[:, :r_c] S[:r_c] / s_c. Nothing is merged
into the base.
"""
from __future__ import annotations

import torch

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.base import ClientUpdate, register
from pipeline.algorithms.hetero_rank import HeteroRankStrategy


@register
class FlexLoRA(HeteroRankStrategy):
    name = "flexlora"

    def contribution(self, update: ClientUpdate):
        p = float(update.n_samples)
        out = {f"w/{k}": v * p for k, v in self.products(update).items()}
        out["weight"] = torch.tensor([p], dtype=torch.float64)
        return out

    def finalize(self, sums) -> dict:
        total = sums["weight"].item()
        for key, a, b in self.pairs:
            a_new, b_new = lm.svd_factors(sums[f"w/{key}"] / total, self.model.lora_rank, self.model.lora_rank)
            self.global_adapters[a] = a_new.float()
            self.global_adapters[b] = b_new.float()  # carries the scale: s B
        return {}
