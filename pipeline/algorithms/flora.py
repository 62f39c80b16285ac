"""`flora`: FLoRA, stacking (ALGORITHMS.md section 4, official code).

A = concat_rows(p_c A_c), B = concat_cols(s_c B_c), so B A = sum_c p_c s_c B_c A_c exactly.
The stacked adapter is merged into the base and every client starts a fresh LoRA next round:
the run's seeded initial LoRA again, truncated to the client's rank [choice: FLoRA's clients
draw their own init; one shared seeded init keeps runs reproducible].
"""
from __future__ import annotations

import torch

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.base import ClientUpdate, register
from pipeline.algorithms.hetero_rank import HeteroRankStrategy


def stack(updates_a: list[torch.Tensor], updates_b: list[torch.Tensor], weights: list[float]):
    """The stacked pair: rows p_c A_c and columns s_c B_c (B already scaled)."""
    a = torch.cat([w * x for w, x in zip(weights, updates_a)], dim=-2)
    b = torch.cat(updates_b, dim=-1)
    return a, b


@register
class FLoRA(HeteroRankStrategy):
    name = "flora"

    def init_state(self, initial_adapters):
        super().init_state(initial_adapters)
        self.fresh = {k: v.clone() for k, v in self.global_adapters.items()}  # the reset point

    def contribution(self, update: ClientUpdate):
        # Stacking needs the individual factors: each client's pair goes into its own slot of
        # the sum (keyed by client), so the sum of contributions is the concatenation.
        p = float(update.n_samples)
        scaled = self.scaled(update)
        out = {"weight": torch.tensor([p], dtype=torch.float64)}
        for key, a, b in self.pairs:
            r = update.lora_rank
            out[f"a/{update.client_id}/{key}"] = scaled[a][..., :r, :] * p
            out[f"b/{update.client_id}/{key}"] = scaled[b][..., :r]
        return out

    def finalize(self, sums) -> dict:
        total = sums["weight"].item()
        clients = sorted({k.split("/")[1] for k in sums if k.startswith("a/")}, key=int)
        for key, a, b in self.pairs:
            a_st, b_st = stack([sums[f"a/{c}/{key}"] / total for c in clients],
                               [sums[f"b/{c}/{key}"] for c in clients], [1.0] * len(clients))
            self.add_delta(key, lm.product(a_st, b_st).float())
        self.global_adapters = {k: v.clone() for k, v in self.fresh.items()}
        return {}

    tensor_state = ("delta", "fresh")
