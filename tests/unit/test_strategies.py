"""Aggregation rules against a direct computation, with plain tensors (no model, no DeepSpeed)."""
import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.config import Tier
from pipeline.errors import ConfigError

INFO = ModelInfo(num_layers=2, num_experts=4, k_max=4, lora_rank=2, lora_alpha=4.0)
TIERS = [Tier(0, "low", 0.25, 1, 1, 1.0), Tier(1, "high", 1.0, 4, 2, 1.0)]


def _adapters(gen):
    return {"layers.0.experts.lora_A": torch.randn(4, 2, 3, generator=gen),
            "layers.0.q_proj.lora_B": torch.randn(5, 2, generator=gen)}


def _update(client, tier, adapters, n):
    return ClientUpdate(client, 1, tier, tier.top_k, 2, adapters, n_samples=n,
                        expert_token_counts=torch.zeros(2, 4), tokens=10)


def _aggregate(strategy, updates):
    sums = {}
    for u in updates:
        for k, v in strategy.contribution(u).items():
            sums[k] = sums[k] + v if k in sums else v.clone()
    strategy.finalize(sums)
    return strategy.global_adapters


@pytest.mark.parametrize("name", ["fedavg", "smoe"])
def test_sample_weighted_average_matches_direct_computation(name):
    gen = torch.Generator().manual_seed(0)
    strategy = build_strategy(name, {}, INFO, TIERS)
    strategy.init_state(_adapters(gen))
    clients = [(_adapters(gen), n) for n in (10, 30, 60)]
    updates = [_update(i, TIERS[i % 2], a, n) for i, (a, n) in enumerate(clients)]
    result = _aggregate(strategy, updates)
    total = sum(n for _, n in clients)
    for key in result:
        direct = sum(a[key] * (n / total) for a, n in clients)
        torch.testing.assert_close(result[key], direct, rtol=1e-6, atol=1e-7)
        assert result[key].dtype == torch.float32


def test_fedavg_ignores_budget_smoe_uses_tier_top_k():
    fedavg = build_strategy("fedavg", {}, INFO, TIERS)
    smoe = build_strategy("smoe", {}, INFO, TIERS)
    for s in (fedavg, smoe):
        s.init_state({"x": torch.zeros(1)})
    assert fedavg.plan(0, 1, TIERS[0]).top_k == INFO.k_max
    assert smoe.plan(0, 1, TIERS[0]).top_k == TIERS[0].top_k


def test_state_dict_roundtrip():
    s = build_strategy("smoe", {}, INFO, TIERS)
    s.init_state({"x": torch.arange(3.0)})
    t = build_strategy("smoe", {}, INFO, TIERS)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.global_adapters["x"], torch.arange(3.0))


def test_unknown_method_and_option():
    with pytest.raises(ConfigError, match="algorithm.name"):
        build_strategy("nope", {}, INFO, TIERS)
    with pytest.raises(ConfigError, match="algorithm.options.foo"):
        build_strategy("smoe", {"foo": 1}, INFO, TIERS)
