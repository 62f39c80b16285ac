"""`fedex-lora`: FedEx-LoRA (ALGORITHMS.md section 4, official code).

FedIT's average of the factors (zero-padded to r_max for heterogeneous ranks, weights
p_c = n_c / sum n) plus the residual sum_c p_c s_c B_c A_c - s B_bar A_bar merged into the
frozen base, which makes the aggregate exact.
"""
from __future__ import annotations

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.base import ClientUpdate, register, weighted_average
from pipeline.algorithms.hetero_rank import HeteroRankStrategy, zero_padded_sum


@register
class FedExLoRA(HeteroRankStrategy):
    name = "fedex-lora"

    def contribution(self, update: ClientUpdate):
        p = float(update.n_samples)
        out = zero_padded_sum(self, update, p)
        out.update({f"w/{k}": v * p for k, v in self.products(update).items()})
        return out

    def finalize(self, sums) -> dict:
        total = sums["weight"].item()
        self.global_adapters = weighted_average(sums, self.global_adapters)
        for key, a, b in self.pairs:
            exact = sums[f"w/{key}"] / total
            self.add_delta(key, (exact - lm.product(self.global_adapters[a], self.global_adapters[b])).float())
        return {}
