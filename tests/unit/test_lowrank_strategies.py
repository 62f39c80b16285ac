"""Heterogeneous-rank baselines: each aggregation rule against a direct computation."""
import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.algorithms import lora_math as lm
from pipeline.algorithms.flora import stack
from pipeline.config import Tier

R_MAX, ALPHA = 4, 8.0
# The LoRA scale a rank-r client trains with: alpha = 2 r (default) or the model's fixed alpha.
SCALES = {"2r": lambda r: 2.0, "fixed": lambda r: ALPHA / r}
INFO = ModelInfo(num_layers=1, num_experts=3, k_max=2, lora_rank=R_MAX, lora_alpha=ALPHA)
TIERS = [Tier(0, "low", 0.25, 1, 1, 1.0), Tier(1, "mid", 0.5, 1, 2, 1.0), Tier(2, "high", 1.0, 2, 4, 1.0)]
SHAPES = {"m.mlp.lora_gate_up_A": (3, R_MAX, 5), "m.mlp.lora_gate_up_B": (3, 6, R_MAX),
          "m.q_proj.lora_A": (R_MAX, 5), "m.q_proj.lora_B": (7, R_MAX)}


def _random(gen, rank=R_MAX):
    out = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    for k in out:  # a rank-r client's factors are zero beyond r
        if k.endswith("_A"):
            out[k][..., rank:, :] = 0
        else:
            out[k][..., rank:] = 0
    return out


def _clients(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(TIERS[i], _random(gen, TIERS[i].lora_rank), n) for i, n in enumerate((10, 30, 60))]


def _run(name, clients, options=None):
    s = build_strategy(name, options or {}, INFO, TIERS)
    s.init_state(_random(torch.Generator().manual_seed(99)))
    sums = {}
    for cid, (tier, adapters, n) in enumerate(clients):
        u = ClientUpdate(cid, 1, tier, INFO.k_max, tier.lora_rank, adapters, n, torch.zeros(1, 3), 1)
        for k, v in s.contribution(u).items():
            sums[k] = sums[k] + v if k in sums else v.clone()
    s.finalize(sums)
    return s


def _weighted_products(clients, scaling="2r"):
    total = sum(n for _, _, n in clients)
    out = {}
    for key, a, b in lm.lora_pairs(SHAPES):
        out[key] = sum((n / total) * SCALES[scaling](t.lora_rank) * lm.product(ad[a], ad[b])
                       for t, ad, n in clients)
    return out


def test_lora_pairs_and_svd_factors_reproduce_truncated_svd():
    assert [k for k, _, _ in lm.lora_pairs(SHAPES)] == ["m.mlp.lora_gate_up", "m.q_proj.lora"]
    w = torch.randn(3, 6, 5, dtype=torch.float64)
    a, b = lm.svd_factors(w, 2, 4)
    assert a.shape == (3, 4, 5) and b.shape == (3, 6, 4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(b @ a, u[..., :2] @ torch.diag_embed(s[..., :2]) @ vh[..., :2, :])


@pytest.mark.parametrize("scaling", ["2r", "fixed"])
def test_flora_stacked_product_equals_weighted_sum_of_products(scaling):
    gen = torch.Generator().manual_seed(1)
    a_list = [torch.randn(r, 5, generator=gen) for r in (1, 2, 4)]
    b_list = [torch.randn(7, r, generator=gen) for r in (1, 2, 4)]
    p = [0.2, 0.3, 0.5]
    a_st, b_st = stack(a_list, b_list, p)
    assert a_st.shape == (7, 5) and b_st.shape == (7, 7)
    torch.testing.assert_close(b_st @ a_st, sum(w * b @ a for w, a, b in zip(p, a_list, b_list)))
    # Through the strategy: the merged base delta is exactly the weighted sum, LoRA reset.
    clients = _clients()
    s = _run("flora", clients, {"lora_alpha": scaling})
    for key, want in _weighted_products(clients, scaling).items():
        torch.testing.assert_close(s.base_delta()[key].double(), want, rtol=1e-5, atol=1e-5)
    for k, v in s.global_adapters.items():
        assert torch.equal(v, s.fresh[k])


@pytest.mark.parametrize("scaling", ["2r", "fixed"])
def test_flexlora_redistributes_the_truncated_svd_of_the_weighted_sum(scaling):
    clients = _clients()
    s = _run("flexlora", clients, {"lora_alpha": scaling})
    for key, a, b in lm.lora_pairs(SHAPES):
        w = _weighted_products(clients, scaling)[key]
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        for tier in TIERS:
            r = tier.lora_rank
            start = s.eval_adapters(tier)
            got = SCALES[scaling](r) * lm.product(start[a], start[b])  # what a rank-r client computes
            want = u[..., :r] @ torch.diag_embed(sv[..., :r]) @ vh[..., :r, :]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert torch.all(start[a][..., r:, :] == 0) and torch.all(start[b][..., r:] == 0)


@pytest.mark.parametrize("scaling", ["2r", "fixed"])
def test_fedex_residual_makes_the_aggregate_exact(scaling):
    clients = _clients()
    s = _run("fedex-lora", clients, {"lora_alpha": scaling})
    total = sum(n for _, _, n in clients)
    for key, a, b in lm.lora_pairs(SHAPES):
        # The global factors are FedIT's zero-padded average of (A, s B) ...
        avg_a = sum(n / total * ad[a] for _, ad, n in clients)
        torch.testing.assert_close(s.global_adapters[a], avg_a.float(), rtol=1e-5, atol=1e-6)
        # ... and base delta + s B_bar A_bar is the exact weighted sum of products.
        full = s.base_delta()[key].double() + lm.product(s.global_adapters[a], s.global_adapters[b])
        torch.testing.assert_close(full, _weighted_products(clients, scaling)[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", ["2r", "fixed"])
def test_hetlora_norm_weighted_zero_padded_average(scaling):
    clients = _clients()
    s = _run("hetlora", clients, {"prune": False, "lora_alpha": scaling})
    scale = SCALES[scaling]
    norms = []
    for t, ad, _ in clients:
        sq = sum((scale(t.lora_rank) * lm.product(ad[a], ad[b])).pow(2).sum() for _, a, b in lm.lora_pairs(SHAPES))
        norms.append(sq.sqrt())
    w = torch.stack(norms) / sum(norms)
    for _, a, b in lm.lora_pairs(SHAPES):
        want_a = sum(wi * ad[a].double() for wi, (_, ad, _) in zip(w, clients))
        want_b = sum(wi * ad[b].double() * scale(t.lora_rank) for wi, (t, ad, _) in zip(w, clients))
        torch.testing.assert_close(s.global_adapters[a], want_a.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.global_adapters[b], want_b.float(), rtol=1e-5, atol=1e-6)


def test_hetero_rank_plans_truncate_and_run_full_top_k():
    s = build_strategy("hetlora", {}, INFO, TIERS)
    s.init_state(_random(torch.Generator().manual_seed(3)))
    plan = s.plan(0, 1, TIERS[0])
    assert plan.top_k == INFO.k_max and plan.lora_rank == 1
    assert torch.all(plan.adapters["m.q_proj.lora_A"][1:] == 0)
    assert torch.all(plan.adapters["m.q_proj.lora_B"][:, 1:] == 0)


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora", "fedex-lora"])
def test_state_roundtrip(name):
    s = _run(name, _clients())
    t = build_strategy(name, {}, INFO, TIERS)
    t.init_state(_random(torch.Generator().manual_seed(5)))
    t.load_state_dict(s.state_dict())
    for k, v in s.global_adapters.items():
        assert torch.equal(t.global_adapters[k], v)
    for k, v in s.base_delta().items():
        assert torch.equal(t.base_delta()[k], v)
    for name in s.tensor_state:  # every further server tensor dict (FLoRA's reset point too)
        assert getattr(t, name).keys() == getattr(s, name).keys()
        assert all(torch.equal(getattr(t, name)[k], v) for k, v in getattr(s, name).items())


def test_hetlora_tail_norm_is_per_expert_and_empty_at_rank_two():
    s = build_strategy("hetlora", {}, INFO, TIERS)  # gamma 0.75
    ad = _random(torch.Generator().manual_seed(4))
    # rank 4: tail = component 3; the expert tensor is 3 matrices, attention LoRA one
    attention = ad["m.q_proj.lora_B"][:, 3].norm() * ad["m.q_proj.lora_A"][3].norm()
    per_expert = sum(ad["m.mlp.lora_gate_up_B"][e, :, 3].norm() * ad["m.mlp.lora_gate_up_A"][e, 3].norm()
                     for e in range(3))
    whole_stack = ad["m.mlp.lora_gate_up_B"][..., 3].norm() * ad["m.mlp.lora_gate_up_A"][:, 3].norm()
    s.init_state(ad)
    torch.testing.assert_close(s.tail_norm(ad, 4), per_expert + attention)
    assert not torch.isclose(per_expert, whole_stack)  # the old reading gives another penalty
    assert s.tail(2) == (2, 2) and s.tail_norm(ad, 2) == 0  # rank 2 at gamma 0.75: nothing
    assert s.extra_loss(None, s.plan(0, 1, TIERS[1])) is None


def test_hetero_rank_model_scale_follows_the_lora_alpha_option():
    from pipeline.model import apply_setting, build_model, patch_olmoe
    from pipeline.model.adapters import lora_modules
    from tests.model.conftest import SMALL_OLMOE

    model = patch_olmoe(build_model(SMALL_OLMOE, seed=0), lora_rank=R_MAX, lora_alpha=ALPHA)
    for scaling in ("2r", "fixed"):
        s = build_strategy("flexlora", {"lora_alpha": scaling}, INFO, TIERS)
        for r in (1, 2, 4):
            apply_setting(model, s.setting(2, r))
            assert {m.scale for m in lora_modules(model)} == {SCALES[scaling](r)} == {s.lora_scale(r)}


def test_bad_lora_alpha_option_is_one_clear_error():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.options.lora_alpha: must be one of 2r, fixed"):
        build_strategy("fedex-lora", {"lora_alpha": 16}, INFO, TIERS)
