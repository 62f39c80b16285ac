"""FedAsync, FedBuff and AlignFed's aggregation against direct computations (ALGORITHMS.md 6)."""
import math

import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.algorithms.alignfed import apply_map, identity_maps
from pipeline.algorithms.asynchronous import Buffered
from pipeline.config import Tier
from pipeline.federation.collectives import PackedSums

R = 2
INFO = ModelInfo(num_layers=1, num_experts=2, k_max=2, lora_rank=R, lora_alpha=4.0)
TIERS = [Tier(0, "low", 0.5, 1, 1, 1.0), Tier(1, "high", 1.0, 2, 2, 1.0)]
KEYS = {"m.layers.0.self_attn.q_proj.lora_A": (R, 3), "m.layers.0.self_attn.q_proj.lora_B": (3, R),
        "m.layers.0.mlp.lora_down_A": (2, R, 4), "m.layers.0.mlp.lora_down_B": (2, 3, R)}


def adapters(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in KEYS.items()}


def update(client: int, values: dict) -> ClientUpdate:
    return ClientUpdate(client, 0, TIERS[client % 2], 1, R, values, n_samples=10,
                        expert_token_counts=torch.zeros(1, 2), tokens=1)


def aggregate(strategy, items, versions, ops=None):
    sums = PackedSums()
    for item in items:
        sums.add(strategy.arrival_contribution(item, versions[item.base_version]))
    return strategy.aggregate(sums.tensors(), versions, ops)


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k].float(), atol=1e-6, rtol=1e-6) for k in a)


@pytest.mark.parametrize("kind,tau,expected", [
    ("constant", 3, 1.0), ("polynomial", 3, 4 ** -0.5), ("hinge", 2, 1.0), ("hinge", 7, 1 / (0.5 * 3 + 1))])
def test_fedasync_mixes_with_each_staleness_function(kind, tau, expected):
    s = build_strategy("fedasync", {"alpha": 0.6, "staleness": kind, "a": 0.5, "b": 4}, INFO, TIERS)
    x, base, new = adapters(0), adapters(1), adapters(2)
    s.init_state(x)
    aggregate(s, [Buffered(update(0, new), 0, tau, 0)], {0: base})
    a = 0.6 * expected
    assert close(s.global_adapters, {k: (1 - a) * x[k] + a * new[k] for k in x})


def test_fedbuff_takes_the_staleness_weighted_mean_step():
    s = build_strategy("fedbuff", {"buffer_size": 3, "server_lr": 0.5}, INFO, TIERS)
    x = adapters(0)
    s.init_state(x)
    versions = {0: adapters(1), 2: adapters(2), 3: x}
    items = [Buffered(update(0, adapters(10)), 3, 0, 0), Buffered(update(1, adapters(11)), 2, 1, 0),
             Buffered(update(2, adapters(12)), 0, 3, 1)]
    aggregate(s, items, versions)
    step = {k: sum((it.update.adapters[k] - versions[it.base_version][k]) / math.sqrt(1 + it.staleness)
                   for it in items) / 3 for k in x}
    assert close(s.global_adapters, {k: x[k] + 0.5 * step[k] for k in x})


def _fair(items, versions, gamma=0.2, eps=1e-8):
    logits = []
    for it in items:
        d = {k: it.update.adapters[k].double() - versions[it.base_version][k].double() for k in KEYS}
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        logits.append(-gamma * it.staleness - 0.5 * math.log(it.uploads + 1) - math.log(norm + eps))
    return torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)


def test_alignfed_fairness_softmax_and_version_grouping():
    s = build_strategy("alignfed", {"align": False}, INFO, TIERS)
    x = adapters(0)
    s.init_state(x)
    s.version = 5
    versions = {5: x, 3: adapters(3)}
    items = [Buffered(update(0, adapters(10)), 5, 0, 0), Buffered(update(1, adapters(11)), 3, 2, 4),
             Buffered(update(2, adapters(12)), 5, 0, 2)]
    sums = PackedSums()
    for it in items:
        sums.add(s.arrival_contribution(it, versions[it.base_version]))
    assert sorted(k for k in sums.tensors() if k.endswith("weight")) == ["v3/weight", "v5/weight"]
    metrics = s.aggregate(sums.tensors(), versions, None)
    w = _fair(items, versions)
    want = {k: x[k].double() + sum(w[i] * (it.update.adapters[k].double() - versions[it.base_version][k].double())
                                   for i, it in enumerate(items)) for k in x}
    assert close(s.global_adapters, want)
    assert metrics["groups"]["3"]["share"] == pytest.approx(float(w[1]))
    assert metrics["tier_weight"] == pytest.approx({"low": float(w[0] + w[2]), "high": float(w[1])})


def test_identity_map_leaves_an_up_to_date_update_unchanged():
    d = adapters(4)
    assert all(torch.equal(apply_map(identity_maps(d, R), d)[k], d[k]) for k in d)

    class NoServer:  # an up-to-date buffer needs no alignment: the server model is never asked
        def __getattr__(self, name):
            raise AssertionError(f"ops.{name} used for an up-to-date buffer")

    s = build_strategy("alignfed", {}, INFO, TIERS)
    x = adapters(0)
    s.init_state(x)
    items = [Buffered(update(0, adapters(10)), 0, 0, 0), Buffered(update(1, adapters(11)), 0, 0, 1)]
    aggregate(s, items, {0: x}, NoServer())
    w = _fair(items, {0: x})
    assert close(s.global_adapters, {k: x[k].double() + sum(w[i] * (it.update.adapters[k].double() - x[k].double())
                                                          for i, it in enumerate(items)) for k in x})


class LinearFeatures:
    """A stand-in server model: features are a fixed linear map of the adapters."""

    def __init__(self):
        self.proj = {k: torch.randn(5, math.prod(s), generator=torch.Generator().manual_seed(i))
                     for i, (k, s) in enumerate(KEYS.items())}

    def use_full_model(self):
        pass

    def calibration_batch(self, size):
        return None

    def mean_features(self, adapters, batch):
        return sum(self.proj[k] @ adapters[k].reshape(-1).float() for k in KEYS)


def test_alignment_map_moves_a_stale_group_towards_the_current_features():
    s = build_strategy("alignfed", {"align_steps": 20, "align_lr": 0.05}, INFO, TIERS)
    x = adapters(0)
    s.init_state(x)
    s.version = 2
    versions = {2: x, 0: adapters(1)}
    metrics = aggregate(s, [Buffered(update(0, adapters(10)), 0, 2, 0)], versions, LinearFeatures())
    before, after = metrics["groups"]["0"]["align_loss"]
    assert after < before


def test_centering_zeroes_a_lone_update():
    s = build_strategy("alignfed", {"center": True, "align": False}, INFO, TIERS)
    x = adapters(0)
    s.init_state(x)
    aggregate(s, [Buffered(update(0, adapters(10)), 0, 0, 0)], {0: x})
    assert close(s.global_adapters, x)
