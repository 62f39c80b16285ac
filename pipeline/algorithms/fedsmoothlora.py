"""`fedsmoothlora`: FedSmoothLoRA (ALGORITHMS.md section 5; official code
wangzehao0704/FedSmoothLoRA, `NLG_exp/fedsmoothlora.py` and `NLG_exp/utils.py`).

Per round t and client c, for every LoRA pair (each expert's matrix on its own):
1. Round-matching matrix W_rm = zeta_t (L_c - G): L_c the client's own last upload (on disk,
   client_store.py), G the server LoRA merged last round; zeta_t constant or cosine-decayed
   (`cosine_zeta_schedule`, the official round index being ours minus one).
2. Gradient-aligned matrix: the base shifted by s W_rm, the mean full-weight gradient over the
   client's first `sample_size` examples in batches of `ga_batch_size` (the official
   `train_set[:bsz * iters]`), LoRA-GA's factors (B_ga, A_ga) (merge_math.lora_ga_factors),
   W_ga = B_ga A_ga; the base goes back.
3. Local init (B_0, A_0) = SVD_r(W_ga + W_rm), B = U_r S_r, A = V_r^T; the base during training is
   W^t - s W_ga (LoRA-GA's compensation). Without a round-matching matrix (round 1, `rm: off`, a
   client sampled for the first time [choice: it has no previous round to match]) the LoRA is
   (B_ga, A_ga) itself, as the official round 0.
4. Ordinary local training; 5. upload L_c = SVD_r(B A - W_ga) (kept as the client's state);
6. server G = SVD_r(sum_c (n_c / n) L_c), merged: W^{t+1} = W^t + s G; a fresh LoRA next round.

Switches: `rm: off` (no round-matching matrix) and `ga: off` (W_ga = 0: the run's standard LoRA
init, A seeded kaiming-uniform and B = 0, where the LoRA would otherwise be SVD_r(0)).
Our choices [choice], documented in docs/fedsmoothlora.md: singular directions at rounding level
are dropped from every SVD (merge_math.significant: an expert few calibration tokens reached has a
low-rank gradient, one none reached a zero one, so W_ga = 0 there), and a LoRA component left
with no signal gets the standard init's A row, so an expert that training does reach still
learns; SVD signs are pinned (merge_math.canonical_signs).
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
from torch import Tensor

from pipeline.algorithms import merge_math as mm
from pipeline.algorithms.base import ClientPlan, ClientUpdate, register
from pipeline.algorithms.client_store import ClientStore, RunStorage
from pipeline.algorithms.merge_backbone import MergeStrategy
from pipeline.algorithms.options import Option
from pipeline.errors import ConfigError

Factors = dict[str, tuple[Tensor, Tensor]]  # pair key -> (A, B)


def cosine_zeta_schedule(current_round: int, total_rounds: int, initial_zeta: float, min_zeta: float) -> float:
    """The official `utils.cosine_zeta_schedule` (rounds counted from 0)."""
    return min_zeta + 0.5 * (initial_zeta - min_zeta) * (1 + math.cos(math.pi * current_round / total_rounds))


@register
class FedSmoothLoRA(MergeStrategy):
    name = "fedsmoothlora"
    tensor_state = ("delta", "merged")
    option_spec = {
        "rm": Option(True, bool), "ga": Option(True, bool),
        # The official default is `constant`; its README prescribes `decay` for non-IID data,
        # which the benchmark's Dirichlet split is.
        "zeta_mode": Option("decay", ("decay", "constant")),
        "zeta": Option(1.0, float, low=0.0), "min_zeta": Option(0.5, float, low=0.0),
        "sample_size": Option(32, int, low=1), "ga_batch_size": Option(4, int, low=1),
        "gamma": Option(64.0, float, low=0.0, open_low=True),
    }

    def __init__(self, options, model, tiers):
        super().__init__(options, model, tiers)
        o = self.options
        if o["ga_batch_size"] > o["sample_size"]:
            raise ConfigError(f"algorithm.options.ga_batch_size: must be at most sample_size="
                              f"{o['sample_size']}, got {o['ga_batch_size']}")
        if o["zeta_mode"] == "decay" and o["min_zeta"] > o["zeta"]:
            raise ConfigError(f"algorithm.options.min_zeta: must be at most zeta={o['zeta']} "
                              f"under zeta_mode: decay, got {o['min_zeta']}")
        self.store: ClientStore | None = None
        self.round = 0
        self._ga: dict[int, Factors] = {}  # the client being trained -> its W_ga (for its upload)

    def init_state(self, initial_adapters):
        super().init_state(initial_adapters)
        self.merged: dict[str, Tensor] = {}  # G: the server LoRA merged last round (A and B names)
        self.pending_index: dict | None = None

    def check_run(self, base_shapes, group_ranks: int) -> None:
        if not self.options["ga"]:
            return
        r = self.model.lora_rank
        for key, shape in base_shapes.items():
            if 2 * r > min(shape[-2:]):
                raise ConfigError(f"model.lora.rank: the gradient-aligned init takes singular vectors r..2r, "
                                  f"so 2 r must be <= {min(shape[-2:])} ({key}), got r = {r}; lower it or "
                                  f"set algorithm.options.ga=false")
        if self.options["ga_batch_size"] < group_ranks:
            raise ConfigError(f"algorithm.options.ga_batch_size: a calibration batch is split over a client "
                              f"group's ranks, so it must be >= tiers[].ranks ({group_ranks}), "
                              f"got {self.options['ga_batch_size']}")

    def attach_storage(self, storage: RunStorage) -> None:
        self.store = ClientStore(storage)
        if self.pending_index is not None:
            self.store.load_state(self.pending_index)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["meta"]["clients"] = self.store.state() if self.store else (self.pending_index or {})
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pending_index = state["meta"].get("clients", {})
        if self.store is not None:
            self.store.load_state(self.pending_index)

    def stage_files(self, directory) -> None:
        self.store.stage(directory)

    def restore_files(self, directory) -> None:
        self.store.restore(directory)

    # --- clients -------------------------------------------------------------------------
    def zeta(self, round_: int) -> float:
        o = self.options
        if o["zeta_mode"] == "constant":
            return o["zeta"]
        return cosine_zeta_schedule(round_ - 1, max(self.total_rounds, 1), o["zeta"], o["min_zeta"])

    def prepare_round(self, ops, round_: int) -> None:
        self.round = round_
        self._ga.clear()

    def prepare_client(self, plan: ClientPlan, ops) -> ClientPlan:
        s, o = self.scale, self.options
        rm = self._round_matching(plan)
        ga: Factors = {}
        if o["ga"]:
            ops.set_base(self.delta, {k: [(s * c, b, a) for c, b, a in t] for k, t in rm.items()})
            n = o["ga_batch_size"] * (o["sample_size"] // o["ga_batch_size"])  # bsz * iters
            grads = ops.weight_gradients(self.setting(plan.top_k, plan.lora_rank),
                                         ops.calibration_batches(n, o["ga_batch_size"]))
            ga = self._ga_factors(grads, ops)
        adapters = {}
        for key, a, b in self.pairs:
            terms = ([(1.0, ga[key][1], ga[key][0])] if key in ga else []) + rm.get(key, [])
            if key not in rm:  # no round to match: the gradient-aligned factors themselves
                a0, b0 = ga[key] if key in ga else (self.global_adapters[a], self.global_adapters[b])
            else:
                a0, b0 = mm.truncated_svd(*reversed(mm.stack(*terms)), self.model.lora_rank)
            adapters[a], adapters[b] = self._standard_where_zero(a, b, a0, b0)
        ops.set_base(self.delta, {k: [(-s, b, a)] for k, (a, b) in ga.items()})  # W^t - s W_ga
        self._ga[plan.client_id] = ga
        return dataclasses.replace(plan, adapters=adapters)

    def _round_matching(self, plan: ClientPlan) -> dict[str, list[tuple[float, Tensor, Tensor]]]:
        """Pair key -> [(zeta, B_L, A_L), (-zeta, B_G, A_G)], or {} without a round to match."""
        zeta = self.zeta(plan.round)
        if not (self.options["rm"] and self.merged and zeta and plan.client_id in self.store):
            return {}
        last = self.store.load(plan.client_id, self.expert_range)
        return {key: [(zeta, last[b], last[a]), (-zeta, self.merged[b], self.merged[a])]
                for key, a, b in self.pairs}

    def _ga_factors(self, grads: dict[str, Tensor], ops) -> Factors:
        out = {}
        for key, _, _ in self.pairs:
            g = grads[key]
            # Seeded by the pair's name, not its position: a resumed strategy lists its pairs in
            # the checkpoint's (sorted) order.
            gen = ops.generator(zlib.crc32(key.encode()))
            out[key] = mm.lora_ga_factors(g, self.model.lora_rank, self.options["gamma"], gen)
        return out

    def _standard_where_zero(self, a_name: str, b_name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """float32 factors; a component whose A row and B column are both zero (no signal: an
        expert no calibration token reached, or `ga: off` without a round to match) gets the
        standard init's A row, so that it can still learn [choice]."""
        dead = (a.abs().amax(-1) == 0) & (b.abs().amax(-2) == 0)  # [.., r]
        a = torch.where(dead[..., :, None], self.global_adapters[a_name].double(), a.double())
        return a.float(), b.float()

    # --- aggregation ---------------------------------------------------------------------
    def contribution(self, update: ClientUpdate):
        """L_c = SVD_r(B A - W_ga), written as the client's state; its slot of the stacked sum."""
        ga = self._ga.pop(update.client_id, {})
        upload = {}
        for key, a, b in self.pairs:
            terms = [(1.0, update.adapters[b], update.adapters[a])]
            if key in ga:
                terms.append((-1.0, ga[key][1], ga[key][0]))
            a_l, b_l = mm.truncated_svd(*reversed(mm.stack(*terms)), self.model.lora_rank)
            upload[a], upload[b] = a_l.float(), b_l.float()  # what is stored is what counts
        self.store.save(update.client_id, update.round, upload, self.expert_range)
        weight = float(update.n_samples)
        c = update.client_id
        out = {"weight": torch.tensor([weight], dtype=torch.float64),
               f"clients/{c}": torch.tensor([1.0], dtype=torch.float64)}
        for _, a, b in self.pairs:  # each client its own slot: the sum over groups is a concatenation
            out[f"a/{c}/{a}"] = upload[a].double()
            out[f"b/{c}/{b}"] = upload[b].double() * weight
        return out

    def finalize(self, sums) -> dict:
        total = sums["weight"].item()
        clients = sorted(int(k.split("/")[1]) for k in sums if k.startswith("clients/"))
        for key, a, b in self.pairs:
            terms = [(1.0 / total, sums[f"b/{c}/{b}"], sums[f"a/{c}/{a}"]) for c in clients]
            a_g, b_g = mm.truncated_svd(*reversed(mm.stack(*terms)), self.model.lora_rank)
            self.merged[a], self.merged[b] = a_g.float(), b_g.float()
            self.merge(key, (1.0, self.merged[a], self.merged[b]))  # W^{t+1} = W^t + s G
        self.store.commit(self.round, clients)
        self.store.prune(self.round)
        return {"zeta": self.zeta(self.round), "clients_with_state": len(self.store.index)}
