"""UB-SMoE's pseudo-gradients on a realistic batch (hundreds of tokens, every expert used),
against references built from scratch: routing by a plain softmax and top-k, pi_i by a loop over
tokens, each expert's weight gradient dL/dW_j by autograd through materialised W_j = W0 + s B A."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms import ModelInfo, build_strategy
from pipeline.algorithms import routing_math as rm
from pipeline.config import Tier
from pipeline.model import build_model, patch_olmoe, set_top_k
from pipeline.model.routing import moe_blocks, set_record_routing

E, H, I, R, TOP_K, N = 16, 32, 16, 2, 3, 300
CONFIG = dict(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4, num_experts=E, num_experts_per_tok=8, max_position_embeddings=64,
              eos_token_id=None, pad_token_id=0)
INFO = ModelInfo(1, E, 8, R, 4.0)
TIER = Tier(0, "low", 0.375, TOP_K, R, 1.0)
RHO = 1 - TOP_K / E


@pytest.fixture(scope="module")
def setup():
    model = patch_olmoe(build_model(CONFIG, seed=0), lora_rank=R, lora_alpha=4.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B, so that both factors get weight-space pseudo-gradients
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    set_top_k(model, TOP_K)
    set_record_routing(model, True)
    x = torch.randn(N, H, generator=gen)
    target = torch.randn(N, H, generator=gen)
    return model, x, target


def _grads(model, x, target, options=None):
    """Expert-LoRA gradients of sum(block(x) * target) with the given ubsmoe options (None: no PG)."""
    m = copy.deepcopy(model)
    if options is not None:
        s = build_strategy("ubsmoe", {"dmr": False, **options}, INFO, [TIER])
        s.configure_model(m, s.plan(0, 1, TIER))
    block = moe_blocks(m)[0]
    (block(x[None])[0] * target).sum().backward()
    return {n: getattr(block, n).grad.clone() for n in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A",
                                                        "lora_down_B")}, block


def _reference(block, x, target):
    """pi, w and G_W per projection, computed without the block's dispatch."""
    probs = F.softmax(x @ block.gate.weight.T, dim=-1)
    top, idx = torch.topk(probs, TOP_K, dim=-1)
    pi, w = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for t in range(N):  # plain loops: pi_i = mean over tokens of p_i * 1[i not chosen]
        for i in range(E):
            if i in idx[t].tolist():
                w[i] += probs[t, i].item()
            else:
                pi[i] += probs[t, i].item() / N
    s = block.scale
    w_gu = (block.experts.gate_up_proj + s * block.lora_gate_up_B @ block.lora_gate_up_A).detach().requires_grad_()
    w_d = (block.experts.down_proj + s * block.lora_down_B @ block.lora_down_A).detach().requires_grad_()
    gate = torch.zeros(N, E).scatter(1, idx, top)
    y = torch.zeros(N, H)
    for e in range(E):
        g, u = (x @ w_gu[e].T).chunk(2, dim=-1)
        y = y + gate[:, e:e + 1] * ((F.silu(g) * u) @ w_d[e].T)
    (y * target).sum().backward()
    g_w = {proj: torch.einsum("e,eoi->oi", w, grad.grad.double()) / w.sum()
           for proj, grad in (("gate_up", w_gu), ("down", w_d))}
    return pi, idx, g_w


def test_weight_space_pg_equals_the_chain_rule_of_the_weighted_weight_gradient(setup):
    model, x, target = setup
    plain, block = _grads(model, x, target)
    pi, idx, g_w = _reference(block, x, target)
    assert idx.unique().numel() == E and torch.all(pi > 0)  # every expert used, all get PG
    got, _ = _grads(model, x, target, {"pg_space": "weight", "pg_scope": "all"})
    s = block.scale
    for proj in ("gate_up", "down"):
        a = getattr(block, f"lora_{proj}_A").detach().double()
        b = getattr(block, f"lora_{proj}_B").detach().double()
        coef = (s * RHO * pi)[:, None, None]
        want_a = coef * (b.transpose(1, 2) @ g_w[proj])
        want_b = coef * (g_w[proj] @ a.transpose(1, 2))
        added_a = (got[f"lora_{proj}_A"] - plain[f"lora_{proj}_A"]).double()
        added_b = (got[f"lora_{proj}_B"] - plain[f"lora_{proj}_B"]).double()
        assert torch.all(added_b.flatten(1).abs().sum(1) > 0)  # every expert's gradient moved
        # `added` is a difference of fp32 gradients: absolute error at fp32 rounding of their size
        for added, want in ((added_a, want_a), (added_b, want_b)):
            torch.testing.assert_close(added, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_factor_space_pg_moves_every_expert_in_proportion_to_its_unserved_mass(setup):
    model, x, target = setup
    plain, block = _grads(model, x, target)
    pi, _, _ = _reference(block, x, target)
    got, _ = _grads(model, x, target, {"pg_space": "factors", "pg_scope": "all"})
    for name in plain:
        added = (got[name] - plain[name]).double().flatten(1)
        per_pi = added / (RHO * pi[:, None])  # the same G_bar for every expert
        torch.testing.assert_close(per_pi, per_pi[:1].expand_as(per_pi), rtol=1e-3,
                                   atol=1e-4 * per_pi.abs().max().item())
        assert per_pi[0].abs().sum() > 0


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_inactive_scope_is_inert_when_every_expert_gets_a_token(setup, space):
    """The reading the issue found at realistic batches: nothing changes."""
    model, x, target = setup
    plain, _ = _grads(model, x, target)
    got, _ = _grads(model, x, target, {"pg_space": space, "pg_scope": "inactive"})
    assert all(torch.equal(got[n], plain[n]) for n in plain)


def test_mass_weighted_weight_gradient_is_the_weighted_sum_of_per_expert_outer_products():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    xs, g = torch.randn(10, 6, generator=gen), torch.randn(10, 4, generator=gen)
    mass = torch.tensor([0.5, 2.0, 1.5, 0.25], dtype=torch.float64)
    got = rm.mass_weighted_weight_gradient(g, xs, counts.cumsum(0), mass)
    want, start = torch.zeros(4, 6), 0
    for j, c in enumerate(counts.tolist()):
        for row in range(start, start + c):
            want += mass[j].item() * torch.outer(g[row], xs[row])
        start += c
    torch.testing.assert_close(got, want)


def test_bad_pg_options_are_one_clear_error():
    from pipeline.errors import ConfigError

    for key, value in (("pg_space", "dense"), ("pg_scope", "some")):
        with pytest.raises(ConfigError, match=f"algorithm.options.{key}: must be one of"):
            build_strategy("ubsmoe", {key: value}, INFO, [TIER])
