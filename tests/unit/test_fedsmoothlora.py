"""FedSmoothLoRA and FRLoRA against direct computations, on a model-free stand-in (FakeOps):
the strategies' own arithmetic, with the base weights, the calibration gradient and local
training replaced by tensors the test controls."""
import zlib

import pytest
import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.algorithms import lora_math as lm
from pipeline.algorithms import merge_math as mm
from pipeline.algorithms.client_store import RunStorage
from pipeline.config import Tier
from pipeline.errors import ConfigError

TIER = Tier(0, "t", 1.0, 2, 4, 1.0)
WEIGHT_SHAPES = {"m.mlp.lora_gate_up": (3, 8, 6), "m.q_proj.lora": (7, 6)}  # 3 experts; attention


def _info(rank):
    return ModelInfo(num_layers=1, num_experts=3, k_max=2, lora_rank=rank, lora_alpha=2.0 * rank)  # s = 2


def _adapter_shapes(rank):
    """In the model's order (attention first), which is not the sorted order a checkpoint loads."""
    return {"m.q_proj.lora_A": (rank, 6), "m.q_proj.lora_B": (7, rank),
            "m.mlp.lora_gate_up_A": (3, rank, 6), "m.mlp.lora_gate_up_B": (3, 8, rank)}


class FakeOps:
    """Records what the strategy sets the base to; hands out fixed gradients."""

    def __init__(self, grads=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.pristine = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in WEIGHT_SHAPES.items()}
        self.grads = grads
        self.base = dict(self.pristine)
        self.calibrated_at = None
        self.seed = seed

    def base_weights(self):
        return ((k, v.float()) for k, v in self.pristine.items())

    def set_base(self, deltas, low_rank=None):
        low_rank = low_rank or {}
        self.base = {k: w + deltas.get(k, torch.zeros(())).double()
                     + sum((c * b.double() @ a.double() for c, b, a in low_rank.get(k, [])), torch.zeros(()))
                     for k, w in self.pristine.items()}

    def calibration_batches(self, n, batch_size):
        return [None] * (n // batch_size)

    def weight_gradients(self, setting, batches):
        self.calibrated_at = dict(self.base)
        return {k: v.float() for k, v in self.grads.items()}

    def generator(self, *keys):
        return torch.Generator().manual_seed(1000 * self.seed + sum(keys) % 100003 + 7)


def _strategy(name, rank, tmp_path, **options):
    s = build_strategy(name, options, _info(rank), [TIER])
    gen = torch.Generator().manual_seed(99)
    s.init_state({k: (torch.rand(v, generator=gen) - 0.5 if k.endswith("_A") else torch.zeros(v))
                  for k, v in _adapter_shapes(rank).items()})
    s.total_rounds = 4
    s.attach_storage(RunStorage(tmp_path / "client_state"))
    return s


def _effective(ops, adapters, scale=2.0):
    return {key: ops.base[key] + scale * lm.product(adapters[a], adapters[b]) for key, a, b in lm.lora_pairs(adapters)}


def _round(s, ops, round_, clients, seed):
    """Every client of `clients` [(id, n)] trains (a seeded perturbation of its start); returns
    each client's start and end effective weights and its trained adapters."""
    s.prepare_round(ops, round_)
    ops.set_base(s.base_delta())  # as run_round does
    gen = torch.Generator().manual_seed(seed)
    sums, out = {}, {}
    for cid, n in clients:
        plan = s.prepare_client(s.plan(cid, round_, TIER), ops)
        trained = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in plan.adapters.items()}
        out[cid] = (_effective(ops, plan.adapters), _effective(ops, trained), trained, {k: v.clone() for k, v in ops.base.items()})
        update = ClientUpdate(cid, round_, TIER, 2, s.model.lora_rank, trained, n, torch.zeros(1, 3), 1)
        for k, v in s.contribution(update).items():
            sums[k] = sums[k] + v if k in sums else v.clone()
    s.finalize(sums)
    return out


def _global_weights(s, ops):
    return {k: ops.pristine[k] + s.delta.get(k, torch.zeros(())).double() for k in ops.pristine}


def test_resampled_client_starts_from_its_own_end_state_with_zeta_one_and_ga_off(tmp_path):
    """r = min(out, in): SVD_r(W_rm) is exact, so merge and round-matching matrix cancel."""
    s = _strategy("fedsmoothlora", 6, tmp_path, ga=False, zeta_mode="constant", zeta=1.0)
    ops = FakeOps()
    first = _round(s, ops, 1, [(0, 10), (1, 30)], seed=1)
    second = _round(s, ops, 2, [(0, 10)], seed=2)
    for key in WEIGHT_SHAPES:
        torch.testing.assert_close(second[0][0][key], first[0][1][key], atol=1e-5, rtol=0)
        assert not torch.allclose(second[0][0][key], _global_weights(s, ops)[key])  # not the global model


def test_round_matching_start_is_the_truncated_official_init_in_general(tmp_path):
    """At r < rank(W_rm) the start is W^t + s SVD_r(W_rm), as the official code truncates it."""
    s = _strategy("fedsmoothlora", 2, tmp_path, ga=False, zeta_mode="constant", zeta=0.7)
    ops = FakeOps()
    _round(s, ops, 1, [(0, 10), (1, 30)], seed=1)
    last = s.store.load(0, None)
    merged = {k: v.clone() for k, v in s.merged.items()}
    w_t = _global_weights(s, ops)
    start = _round(s, ops, 2, [(0, 10)], seed=2)[0][0]
    for key, a, b in lm.lora_pairs(last):
        w_rm = 0.7 * (lm.product(last[a], last[b]) - lm.product(merged[a], merged[b]))
        u, sv, vh = torch.linalg.svd(w_rm)
        want = w_t[key] + 2.0 * (u[..., :2] * sv[..., None, :2]) @ vh[..., :2, :]
        torch.testing.assert_close(start[key], want, atol=1e-5, rtol=0)


def test_ga_init_reproduces_the_official_construction_and_leaves_the_function_unchanged(tmp_path):
    rank, gamma = 2, 64.0
    gen = torch.Generator().manual_seed(5)
    grads = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in WEIGHT_SHAPES.items()}
    grads["m.mlp.lora_gate_up"][1] = 0  # an expert no calibration token reached
    s = _strategy("fedsmoothlora", rank, tmp_path, gamma=gamma)
    ops = FakeOps(grads)
    s.prepare_round(ops, 1)
    plan = s.prepare_client(s.plan(0, 1, TIER), ops)
    assert all(torch.equal(ops.calibrated_at[k], ops.pristine[k]) for k in grads)  # round 1: no shift
    for key, a, b in lm.lora_pairs(plan.adapters):
        g = grads[key].reshape(-1, *grads[key].shape[-2:])
        for e in range(g.shape[0]):
            if not g[e].any():
                continue
            torch.manual_seed(ops.generator(zlib.crc32(key.encode())).initial_seed())  # peft: global RNG
            u, _, v = torch.svd_lowrank(g[e], q=min(4 * rank, *g[e].shape), niter=4)
            u, v = mm.canonical_signs(u, v)  # our one departure: signs pinned
            c = g.shape[-2] ** 0.25 / gamma ** 0.5
            got_a = plan.adapters[a].reshape(-1, rank, g.shape[-1])[e]
            got_b = plan.adapters[b].reshape(-1, g.shape[-2], rank)[e]
            torch.testing.assert_close(got_b.double(), u[:, rank:2 * rank] * c, atol=1e-6, rtol=0)
            torch.testing.assert_close(got_a.double(), v[:, :rank].T * c, atol=1e-6, rtol=0)
        start = ops.base[key] + 2.0 * lm.product(plan.adapters[a], plan.adapters[b])
        torch.testing.assert_close(start, ops.pristine[key], atol=1e-5, rtol=0)  # compensated base
    # The zero-gradient expert: standard init (seeded A, B = 0) and no compensation.
    assert torch.equal(plan.adapters["m.mlp.lora_gate_up_A"][1], s.global_adapters["m.mlp.lora_gate_up_A"][1])
    assert not plan.adapters["m.mlp.lora_gate_up_B"][1].any()
    assert torch.equal(ops.base["m.mlp.lora_gate_up"][1], ops.pristine["m.mlp.lora_gate_up"][1])


def test_ga_factors_of_a_low_rank_gradient_are_stable_under_rounding_noise():
    """An expert few tokens reached has a gradient of rank < 2r: the directions beyond it are
    noise, dropped, so a gradient summed in another order (rel. 1e-9) gives the same factors;
    signs are pinned, so they cannot flip either."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 16, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 3, 12, generator=gen, dtype=torch.float64)
    noisy = g + 1e-9 * g.abs().max() * torch.randn(g.shape, generator=gen, dtype=torch.float64)
    a, b = mm.lora_ga_factors(g, 2, 64.0, torch.Generator().manual_seed(0))
    a2, b2 = mm.lora_ga_factors(noisy, 2, 64.0, torch.Generator().manual_seed(0))
    assert b[..., 1:].abs().max() == 0 and b[..., 0].abs().min() > 0  # rank 3: only U[:, 2] is signal
    torch.testing.assert_close((a2, b2), (a, b), atol=1e-7, rtol=0)
    a3, b3 = mm.lora_ga_factors(-g, 2, 64.0, torch.Generator().manual_seed(0))  # every SVD sign flips
    torch.testing.assert_close(b3 @ a3, -(b @ a))


def test_upload_and_server_merge_equal_direct_svds_per_expert(tmp_path):
    rank = 2
    gen = torch.Generator().manual_seed(6)
    grads = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in WEIGHT_SHAPES.items()}
    s = _strategy("fedsmoothlora", rank, tmp_path)
    ops = FakeOps(grads)
    clients = [(0, 10), (1, 30), (2, 60)]
    out = _round(s, ops, 1, clients, seed=3)

    def svd_r(m):
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        return (u[..., :rank] * sv[..., None, :rank]) @ vh[..., :rank, :]

    for key, a, b in lm.lora_pairs(s.global_adapters):
        mean = 0
        for cid, n in clients:
            _, _, trained, base = out[cid]
            w_ga = (ops.pristine[key] - base[key]) / 2.0  # the base was W - s W_ga
            upload = s.store.load(cid, None)
            torch.testing.assert_close(lm.product(upload[a], upload[b]),
                                       svd_r(lm.product(trained[a], trained[b]) - w_ga), atol=1e-5, rtol=0)
            mean = mean + n / 100 * lm.product(upload[a], upload[b])
        torch.testing.assert_close(s.delta[key].double(), 2.0 * svd_r(mean), atol=1e-5, rtol=0)


def test_client_state_persists_for_unsampled_clients_and_survives_a_checkpoint(tmp_path):
    s = _strategy("fedsmoothlora", 2, tmp_path / "a")
    gen = torch.Generator().manual_seed(8)
    ops = FakeOps({k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in WEIGHT_SHAPES.items()})
    _round(s, ops, 1, [(0, 10), (1, 30)], seed=1)
    kept = s.store.load(1, None)
    _round(s, ops, 2, [(0, 10), (2, 20)], seed=2)
    assert s.store.index == {0: 2, 1: 1, 2: 2}
    assert all(torch.equal(kept[k], v) for k, v in s.store.load(1, None).items())
    assert sorted(p.name for p in s.store.root.iterdir()) == [  # round 1's file of client 0 pruned
        "c000000-r000002.safetensors", "c000001-r000001.safetensors", "c000002-r000002.safetensors"]
    # A checkpoint holds the files; a strategy restored from it (its own, empty store) plans alike.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    s.stage_files(ckpt)
    state = s.state_dict()
    state["tensors"] = dict(sorted(state["tensors"].items()))  # as a checkpoint loads them
    t = _strategy("fedsmoothlora", 2, tmp_path / "b")
    t.load_state_dict(state)
    t.restore_files(ckpt)
    for strategy in (s, t):
        strategy.prepare_round(ops, 3)
    plans = [x.prepare_client(x.plan(1, 3, TIER), ops).adapters for x in (s, t)]
    assert all(torch.equal(plans[0][k], plans[1][k]) for k in plans[0])
    assert any(plans[0][k].ne(s.global_adapters[k]).any() for k in plans[0])  # it did round-match


def test_frlora_pissa_init_is_function_preserving_and_merges_the_uniform_factor_mean(tmp_path):
    s = _strategy("frlora", 2, tmp_path)
    ops = FakeOps()
    out = _round(s, ops, 1, [(0, 10), (1, 30)], seed=4)
    for key, a, b in lm.lora_pairs(s.global_adapters):
        start = out[0][0][key]
        torch.testing.assert_close(start, ops.pristine[key], atol=1e-5, rtol=0)
        mean_a = (out[0][2][a].double() + out[1][2][a].double()) / 2  # official: uniform weights
        mean_b = (out[0][2][b].double() + out[1][2][b].double()) / 2
        want = ops.pristine[key] + 2.0 * lm.product(mean_a, mean_b) - 2.0 * lm.product(s.fresh[a], s.fresh[b])
        got = _global_weights(s, ops)[key] + 2.0 * lm.product(s.global_adapters[a], s.global_adapters[b])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(s.global_adapters[a], s.fresh[a])  # reset to the PiSSA factors


@pytest.mark.parametrize("options, field", [({"ga_batch_size": 64}, "ga_batch_size"),
                                            ({"zeta": 0.3, "min_zeta": 0.5}, "min_zeta"),
                                            ({"zeta_mode": "linear"}, "zeta_mode"),
                                            ({"gamma": 0}, "gamma")])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=f"algorithm.options.{field}"):
        build_strategy("fedsmoothlora", options, _info(2), [TIER])


def test_truncated_svd_and_seeded_randomized_svd_match_torch():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(3, 9, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    a_r, b_r = mm.truncated_svd(b, a, 3)
    u, sv, vh = torch.linalg.svd(b @ a)
    torch.testing.assert_close(b_r @ a_r, (u[..., :3] * sv[..., None, :3]) @ vh[..., :3, :])
    m = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    u, sv, v = mm.randomized_svd(m, 4, 2, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    u2, sv2, v2 = torch.svd_lowrank(m, q=4, niter=2)
    torch.testing.assert_close((u, sv, v), (u2, sv2, v2))


def test_memory_plan_counts_the_pristine_copy_the_calibration_gradient_and_the_state_on_disk():
    from pipeline.config import DEFAULT_CONFIG, load_config
    from pipeline.plan.memory import adapted_base_params, client_state_bytes, model_shape, tier_memory

    shape = model_shape("assets/tiny-olmoe")
    H, I, E, L = shape.hidden, shape.intermediate, shape.experts, shape.layers
    base = L * (4 * H * H + E * 3 * H * I)  # q, k, v, o (4 heads of 32, no GQA) and the experts

    def method(*overrides):
        cfg = load_config(DEFAULT_CONFIG, ["model.source=assets/tiny-olmoe", *overrides])
        return tier_memory(shape, cfg, 0, 2, cfg.tiers[0].ranks).method, cfg

    assert adapted_base_params(shape, load_config(DEFAULT_CONFIG)) == base
    assert method("algorithm.name=smoe")[0] == 0
    assert method("algorithm.name=frlora")[0] == 4 * base  # fp32 pristine copy
    assert method("algorithm.name=fedsmoothlora")[0] == 8 * base  # + the fp32 calibration gradient
    assert method("algorithm.name=fedsmoothlora", "algorithm.options={ga: false}")[0] == 4 * base
    assert method("algorithm.name=fedsmoothlora", "deepspeed.zero_stage=3")[0] == 4 * base  # copy on the CPU
    ep = method("algorithm.name=fedsmoothlora", "tiers.0.ranks=2", "tiers.0.ep_size=2")[0]
    assert ep == 8 * L * (4 * H * H + E * 3 * H * I / 2)  # this rank's experts only
    cfgs = [method("algorithm.name=fedsmoothlora", f"federation.clients={n}")[1] for n in (10, 1000)]
    assert client_state_bytes(shape, cfgs[1]) == 100 * client_state_bytes(shape, cfgs[0]) > 0


def test_shipped_configs_and_comparison_specs_name_valid_methods():
    from pathlib import Path

    from pipeline.algorithms import check_method
    from pipeline.config import load_config
    from pipeline.eval.compare import read_spec

    root = Path(__file__).resolve().parents[2] / "configs"
    names = set()
    for path in sorted((root / "olmoe-1b-7b").glob("*.yaml")):
        cfg = load_config(path)
        check_method(cfg.algorithm.name, cfg.algorithm.options)
        names.add(cfg.algorithm.name)
    assert {"fedsmoothlora", "frlora"} <= names
    new = {"fedsmoothlora": {}, "fedsmoothlora-no-rm": {"rm": False}, "fedsmoothlora-no-ga": {"ga": False},
           "frlora": {}}
    for spec_path in (root / "compare" / "benchmark.yaml", root / "compare" / "skills.yaml",
                      root / "compare" / "skills-long.yaml"):
        spec = read_spec(spec_path)
        for method, options in new.items():
            cfg = load_config(spec.base, [*spec.overrides, *spec.methods[method]])
            assert cfg.algorithm.name == method.split("-")[0] and cfg.algorithm.options == options
            check_method(cfg.algorithm.name, cfg.algorithm.options)
