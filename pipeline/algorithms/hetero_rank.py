"""Shared machinery of the heterogeneous-rank LoRA baselines (ALGORITHMS.md section 4).

These methods spend a tier's budget on LoRA rank, not on experts: every client runs the full
top-k at its tier's rank r_c. The global LoRA is kept at r_max with the scale folded into B
(`B_scaled = s * B`), so clients of different ranks meet on s_c B_c A_c. Methods that merge
updates into the frozen base keep the merged sum in `self.delta` (see `Strategy.base_delta`).

LoRA scale: `lora_alpha: 2r` (default) sets alpha = 2 r_c, a scale of 2 at every rank, as the
official heterogeneous-rank codes do (FLoRA's `lora_alpha=2*local_ranks[client_id]`);
`lora_alpha: fixed` keeps the model's alpha, a scale alpha / r_c that grows as the rank shrinks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.base import ClientPlan, ClientUpdate
from pipeline.algorithms.delta_state import DeltaStrategy
from pipeline.algorithms.options import Option
from pipeline.config import Tier
from pipeline.model.setting import ModelSetting

ALPHA_PER_RANK = 2.0  # alpha = 2 r in the official heterogeneous-rank codes


class HeteroRankStrategy(DeltaStrategy):
    option_spec = {"lora_alpha": Option("2r", ("2r", "fixed"))}

    def lora_scale(self, rank: int) -> float:
        """The LoRA scale s_c a client of rank `rank` trains with."""
        if self.options["lora_alpha"] == "2r":
            return ALPHA_PER_RANK
        return lm.scale(self.model.lora_alpha, rank)

    def setting(self, top_k: int, lora_rank: int) -> ModelSetting:
        return ModelSetting(top_k, lora_rank,
                            lora_scale=ALPHA_PER_RANK if self.options["lora_alpha"] == "2r" else None)

    def init_state(self, initial_adapters: dict[str, Tensor]) -> None:
        super().init_state(initial_adapters)
        s_max = self.lora_scale(self.model.lora_rank)
        for _, _, b in self.pairs:  # stored scaled: s_max * B
            self.global_adapters[b] = self.global_adapters[b] * s_max

    def add_delta(self, key: str, value: Tensor) -> None:
        self.delta[key] = self.delta[key] + value if key in self.delta else value.clone()

    # --- clients ----------------------------------------------------------------------------
    def client_rank(self, client_id: int, tier: Tier) -> int:
        return tier.lora_rank

    def factors_at_rank(self, adapters: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
        out = {}
        for _, a, b in self.pairs:
            out[a], out[b] = lm.client_factors(adapters[a], adapters[b], rank, self.lora_scale(rank))
        return out

    def plan(self, client_id: int, round_: int, tier: Tier) -> ClientPlan:
        rank = self.client_rank(client_id, tier)
        return ClientPlan(client_id, round_, tier, top_k=self.model.k_max, lora_rank=rank,
                          adapters=self.factors_at_rank(self.global_adapters, rank))

    def scaled(self, update: ClientUpdate) -> dict[str, Tensor]:
        """The update's factors with B carrying the client's scale s_c (float64)."""
        s_c = self.lora_scale(update.lora_rank)
        out = {}
        for _, a, b in self.pairs:
            out[a] = update.adapters[a].double()
            out[b] = update.adapters[b].double() * s_c
        return out

    def products(self, update: ClientUpdate) -> dict[str, Tensor]:
        """s_c B_c A_c per pair, float64."""
        scaled = self.scaled(update)
        return {key: lm.product(scaled[a], scaled[b]) for key, a, b in self.pairs}

    # --- evaluation ---------------------------------------------------------------------------
    def eval_setting(self, tier: Tier) -> ModelSetting:
        return self.setting(self.model.k_max, tier.lora_rank)

    def eval_adapters(self, tier: Tier | None = None) -> dict[str, Tensor]:
        return self.factors_at_rank(self.global_adapters, tier.lora_rank if tier else self.model.lora_rank)


def zero_padded_sum(strategy: HeteroRankStrategy, update: ClientUpdate, weight: float) -> dict[str, Tensor]:
    """weight * (A_c, s_c B_c), already zero beyond r_c, and the weight: a weighted average's parts."""
    out = {f"sum/{k}": v * weight for k, v in strategy.scaled(update).items()}
    out["weight"] = torch.tensor([float(weight)], dtype=torch.float64)
    return out
