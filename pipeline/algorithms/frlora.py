"""`frlora`: FRLoRA (ALGORITHMS.md section 5; official code IAMJackYan/FRLoRA).

Once, from the pretrained weights: PiSSA factors (B_0, A_0) of every LoRA target, each expert's
weight on its own (`fed_global.py` `ours_init`), and the base compensated, W_res = W - s B_0 A_0,
so the model is unchanged. Every round every client trains from (B_0, A_0); the server averages
the factors (FedIT's B_bar, A_bar), merges s (B_bar A_bar - B_0 A_0) into the base and resets
the LoRA to (B_0, A_0) (`label_skew_ours.py`).

Aggregation weights: the official `global_aggregate` overwrites the sample counts with ones, so
clients are averaged uniformly (`weights: uniform`, the default); `weights: samples` uses
n_c / sum n as the other methods here do. The base compensation is held in `delta` like the
merged updates, so evaluation and export see W_res + merges with the LoRA at (B_0, A_0).
"""
from __future__ import annotations

import torch

from pipeline.algorithms import merge_math as mm
from pipeline.algorithms.base import ClientUpdate, register, weighted_average, weighted_sum_contribution
from pipeline.algorithms.merge_backbone import MergeStrategy
from pipeline.algorithms.options import Option


@register
class FRLoRA(MergeStrategy):
    name = "frlora"
    option_spec = {"weights": Option("uniform", ("uniform", "samples"))}

    def init_state(self, initial_adapters):
        super().init_state(initial_adapters)
        self.fresh: dict[str, torch.Tensor] = {}  # (A_0, B_0) once PiSSA has run

    def prepare_round(self, ops, round_: int) -> None:
        """PiSSA from the pristine base, once (round 1, or a resume from round 0's checkpoint)."""
        if self.fresh:
            return
        names = {key: (a, b) for key, a, b in self.pairs}
        for key, weight in ops.base_weights():  # one weight at a time
            a, b = names[key]
            a0, b0 = mm.pissa_factors(weight, self.model.lora_rank, self.scale)
            self.fresh[a], self.fresh[b] = a0.float(), b0.float()
            self.merge(key, (-1.0, self.fresh[a], self.fresh[b]))  # W_res = W - s B_0 A_0
        self.global_adapters = {k: v.clone() for k, v in self.fresh.items()}

    def contribution(self, update: ClientUpdate):
        weight = 1.0 if self.options["weights"] == "uniform" else float(update.n_samples)
        return weighted_sum_contribution(update.adapters, weight)

    def finalize(self, sums) -> dict:
        mean = weighted_average(sums, self.global_adapters)
        for key, a, b in self.pairs:
            self.merge(key, (1.0, mean[a], mean[b]), (-1.0, self.fresh[a], self.fresh[b]))
        self.global_adapters = {k: v.clone() for k, v in self.fresh.items()}
        return {}

    tensor_state = ("delta", "fresh")
