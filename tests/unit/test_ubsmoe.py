"""UB-SMoE strategy: server update and expert-wise aggregation against direct computations,
and the pseudo-gradient hook on a real block."""
import copy
import math

import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.config import Tier
from pipeline.model import build_model, patch_olmoe, set_top_k
from pipeline.model.routing import enable_routing_modulation, moe_blocks, set_record_routing

INFO = ModelInfo(num_layers=2, num_experts=4, k_max=2, lora_rank=2, lora_alpha=4.0)
TIERS = [Tier(0, "low", 0.5, 1, 1, 1.0), Tier(1, "high", 1.0, 2, 2, 1.0)]


def _adapters(gen):
    out = {}
    for layer in range(2):
        out[f"model.layers.{layer}.mlp.lora_down_A"] = torch.randn(4, 2, 3, generator=gen)
        out[f"model.layers.{layer}.mlp.phi"] = torch.randn(4, generator=gen) * 0.1
    out["model.layers.0.self_attn.q_proj.lora_A"] = torch.randn(2, 3, generator=gen)
    return out


def _aggregate(strategy, clients):
    sums = {}
    for cid, (tier, adapters, counts, n) in enumerate(clients):
        tokens = int(counts[0].sum().item() / tier.top_k)
        u = ClientUpdate(cid, 1, tier, tier.top_k, 2, adapters, n, counts, tokens)
        for k, v in strategy.contribution(u).items():
            sums[k] = sums[k] + v if k in sums else v.clone()
    strategy.finalize(sums)


def _clients(gen):
    c0 = torch.tensor([[8.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0]])  # 8 tokens at k=1
    c1 = torch.tensor([[6.0, 6.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]])  # 8 tokens at k=2
    return [(TIERS[0], _adapters(gen), c0, 10), (TIERS[1], _adapters(gen), c1, 30)]


def test_server_phi_update_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    s = build_strategy("ubsmoe", {}, INFO, TIERS)
    s.init_state(_adapters(gen))
    clients = _clients(gen)
    _aggregate(s, clients)
    w = torch.tensor([10.0, 30.0]) / 40
    u = w[0] * clients[0][2] / 8 + w[1] * clients[1][2] / 8
    torch.testing.assert_close(s.utilisation, u.float())
    u_star = (w[0] * 1 + w[1] * 2) / 4
    for layer in range(2):
        key = f"model.layers.{layer}.mlp.phi"
        mean_phi = w[0] * clients[0][1][key] + w[1] * clients[1][1][key]
        raw = torch.tanh(u_star / (u[layer] + 1e-6) - 1)
        torch.testing.assert_close(s.global_adapters[key], 0.9 * mean_phi + 0.1 * raw, rtol=1e-5, atol=1e-6)
    # Layer 0: expert 0 overused -> pushed down, experts 2 and 3 underused -> pushed up.
    raw0 = torch.tanh(u_star / (u[0] + 1e-6) - 1)
    assert raw0[0] < 0 < raw0[2] and math.isclose(raw0[2].item(), raw0[3].item())


def test_expert_wise_aggregation_weights_each_expert_by_its_routed_tokens():
    gen = torch.Generator().manual_seed(1)
    s = build_strategy("ubsmoe", {"aggregation": "expert-wise"}, INFO, TIERS)
    start = _adapters(gen)
    s.init_state(start)
    clients = _clients(gen)
    _aggregate(s, clients)
    for layer in range(2):
        key = f"model.layers.{layer}.mlp.lora_down_A"
        for e in range(4):
            a = [c[2][layer, e] for c in clients]
            if sum(a) == 0:  # no tokens anywhere: the expert keeps its previous value
                want = start[key][e]
            else:
                want = sum(ai * c[1][key][e] for ai, c in zip(a, clients)) / sum(a)
            torch.testing.assert_close(s.global_adapters[key][e], want, rtol=1e-5, atol=1e-6)
    # Non-expert tensors still use sample weights.
    q = "model.layers.0.self_attn.q_proj.lora_A"
    torch.testing.assert_close(s.global_adapters[q], 0.25 * clients[0][1][q] + 0.75 * clients[1][1][q])


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_pg_scope_inactive_gives_gradients_to_inactive_experts_only_scaled_by_rho(space):
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                  max_position_embeddings=64, eos_token_id=None, pad_token_id=0)
    info = ModelInfo(1, 16, 4, 2, 4.0)
    tier = Tier(0, "low", 0.25, 1, 2, 1.0)
    model = patch_olmoe(build_model(config, seed=0), lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():  # non-zero B so that active experts' A get gradients
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    enable_routing_modulation(model, 8)
    set_record_routing(model, True)
    set_top_k(model, 1)
    ids = torch.randint(1, 64, (1, 4), generator=torch.Generator().manual_seed(0))

    def grad_with(rho_kind):
        m = copy.deepcopy(model)
        if rho_kind is not None:
            s = build_strategy("ubsmoe", {"rho": rho_kind, "pg_scope": "inactive", "pg_space": space},
                               info, [tier])
            s.configure_model(m, s.plan(0, 1, tier))
        m(ids, labels=ids).loss.backward()
        block = moe_blocks(m)[0]
        return block.lora_down_A.grad, block.token_counts > 0

    before, active = grad_with(None)
    assert torch.all(before[~active] == 0) and before[active].abs().sum() > 0
    added = {}
    for rho_kind in ("sparsity", "inverse"):
        after, _ = grad_with(rho_kind)
        assert torch.equal(after[active], before[active])  # active experts untouched
        assert torch.all(after[~active].flatten(1).abs().sum(1) > 0)  # every inactive expert moved
        added[rho_kind] = after - before
    ratio = (1 - 1 / 16) / (16 / 1)
    torch.testing.assert_close(added["sparsity"], ratio * added["inverse"], rtol=1e-4, atol=1e-8)


def test_dmr_server_loop_moves_load_toward_uniform_on_a_skewed_router():
    from pipeline.algorithms import routing_math as rm

    config = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=8,
                  max_position_embeddings=64, eos_token_id=None, pad_token_id=0)
    model = patch_olmoe(build_model(config, seed=0), lora_rank=2, lora_alpha=4.0)
    set_top_k(model, 2)
    enable_routing_modulation(model, 4)
    block = moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=gen)
    x = torch.randn(2000, 32, generator=gen) + direction
    with torch.no_grad():  # experts 0-3 lean towards the tokens' shared direction: overused
        block.gate.weight.copy_(torch.randn(16, 32, generator=gen) * 0.3)
        block.gate.weight[:4] += 0.3 * direction / direction.norm()

    def load():
        block.token_counts.zero_()
        with torch.no_grad():
            block(x[None])
        return block.token_counts.double()

    cv = lambda c: (c.std(unbiased=False) / c.mean()).item()  # noqa: E731
    start = load()
    counts = start
    for _ in range(10):  # the server's update, clients keeping the broadcast phi
        raw = rm.phi_raw(counts / len(x), u_star=2 / 16)
        with torch.no_grad():
            block.phi.copy_(rm.momentum_phi(block.phi.double(), raw, zeta=0.9).float())
        counts = load()
    assert cv(counts) < 0.9 * cv(start)
    assert torch.all(block.phi[start > 2 * start.mean()] < 0)  # overused experts pushed down
