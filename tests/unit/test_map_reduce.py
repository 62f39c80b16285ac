"""Strategies are map-reduce: contributions computed in different processes (client groups),
summed, and finalized everywhere give the state of one process doing it all (the MPI round loop
relies on this: a group only sees its own clients' updates)."""
import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.config import Tier

R_MAX, ALPHA = 4, 8.0
INFO = ModelInfo(num_layers=1, num_experts=3, k_max=2, lora_rank=R_MAX, lora_alpha=ALPHA)
TIERS = [Tier(0, "low", 0.25, 1, 1, 1.0), Tier(1, "mid", 0.5, 1, 2, 1.0), Tier(2, "high", 1.0, 2, 4, 1.0)]
SHAPES = {"m.mlp.lora_gate_up_A": (3, R_MAX, 5), "m.mlp.lora_gate_up_B": (3, 6, R_MAX),
          "m.q_proj.lora_A": (R_MAX, 5), "m.q_proj.lora_B": (7, R_MAX)}


def _random(gen, rank=R_MAX, scale=1.0):
    out = {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    for k in out:
        if k.endswith("_A"):
            out[k][..., rank:, :] = 0
        else:
            out[k][..., rank:] = 0
    return out


def _strategy(name, options):
    s = build_strategy(name, options, INFO, TIERS)
    s.init_state(_random(torch.Generator().manual_seed(99)))
    return s


def _updates():
    gen = torch.Generator().manual_seed(1)
    out = []
    for cid in range(6):
        tier = TIERS[cid % 3]
        # small factors for some clients, so that tail norms fall and HetLoRA prunes
        adapters = _random(gen, tier.lora_rank, scale=0.1 if cid % 2 else 1.0)
        out.append(ClientUpdate(cid, 1, tier, INFO.k_max, tier.lora_rank, adapters, 10 + cid,
                                torch.rand(1, 3, generator=gen) * 10, 10))
    return out


def _sum(strategy, updates):
    sums = {}
    for u in updates:
        for k, v in strategy.contribution(u).items():
            sums[k] = sums[k] + v if k in sums else v.clone()
    return sums


@pytest.mark.parametrize("name, options", [("hetlora", {"prune": True}), ("flexlora", {}),
                                           ("flora", {}), ("fedex-lora", {})])
def test_groups_summing_their_own_clients_reach_the_single_process_state(name, options):
    updates = _updates()
    single = _strategy(name, options)
    single.finalize(_sum(single, updates))
    groups = [_strategy(name, options), _strategy(name, options)]
    parts = [_sum(groups[0], updates[:4]), _sum(groups[1], updates[4:])]
    total = dict(parts[0])
    for k, v in parts[1].items():
        total[k] = total[k] + v if k in total else v
    for g in groups:
        g.finalize(total)
        want, got = single.state_dict(), g.state_dict()
        assert got["meta"] == want["meta"]
        assert got["tensors"].keys() == want["tensors"].keys()
        for k, v in want["tensors"].items():
            torch.testing.assert_close(got["tensors"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    if name == "hetlora":  # only rank-4 clients (2 and 5, one per group) have a tail to prune
        assert single.ranks == {"2": 3, "5": 3}
