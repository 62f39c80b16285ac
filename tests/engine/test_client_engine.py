"""The DeepSpeed client against an independent plain-PyTorch AdamW loop on the same batches."""
import copy
import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.config import DeepSpeedConfig, TrainConfig  # noqa: E402
from pipeline.engine.client import ClientEngine, init_distributed  # noqa: E402
from pipeline.model import (adapter_parameters, build_model, expert_token_counts,  # noqa: E402
                            init_adapter_state, load_adapter_state, patch_olmoe, set_top_k,
                            ModelSetting)
from tests.conftest import relative_difference  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
              max_position_embeddings=64, eos_token_id=None, pad_token_id=0)
TRAIN = TrainConfig(local_steps=4, batch_size=4, lr=1e-2, weight_decay=0.01, grad_clip=1.0,
                    max_length=12)


@pytest.fixture(scope="module", autouse=True)
def world():
    init_distributed()


def _model():
    model = build_model(CONFIG, seed=0)
    return patch_olmoe(model, lora_rank=4, lora_alpha=8.0)


def _adapters(model, seed):
    # Non-zero B as well, so that every adapter tensor gets gradients from the first step.
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in init_adapter_state(model, seed).items()}


def _batches(seed, n=TRAIN.local_steps):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (TRAIN.batch_size, TRAIN.max_length), generator=gen)
        labels = ids.clone()
        labels[:, : TRAIN.max_length // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _reference(model, adapters, top_k, batches):
    """Plain PyTorch: AdamW, the same clipping, no DeepSpeed."""
    model = copy.deepcopy(model)
    load_adapter_state(model, adapters)
    set_top_k(model, top_k)
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(list(params.values()), lr=TRAIN.lr, weight_decay=TRAIN.weight_decay)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), TRAIN.grad_clip)
        opt.step()
        opt.zero_grad()
    return {k: p.detach().clone() for k, p in params.items()}


def _assert_same(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("zero_stage, tol", [(0, 1e-6), (2, 1e-5), (3, 1e-5)])
def test_deepspeed_client_matches_plain_pytorch_loop(zero_stage, tol):
    model = _model()
    pristine = copy.deepcopy(model)
    engine = ClientEngine(model, TRAIN, DeepSpeedConfig(zero_stage=zero_stage))
    if zero_stage:  # ZeRO's gradient bucket holds the adapters, not DeepSpeed's 5e8 elements
        elements = sum(p.numel() for p in adapter_parameters(pristine).values())
        assert engine.optimizer.reduce_bucket_size == elements
    # Two virtual clients on one engine: the second must not inherit the first's optimizer state.
    for client, top_k in ((1, 4), (2, 2)):
        start, batches = _adapters(pristine, client), _batches(client)
        result = engine.train(start, ModelSetting(top_k, 4), batches)
        want = _reference(pristine, start, top_k, batches)
        _assert_same(result.adapters, want, rtol=tol, atol=tol)
        assert any(not torch.equal(result.adapters[k], start[k]) for k in start)
        tokens = TRAIN.local_steps * TRAIN.batch_size * TRAIN.max_length
        assert result.expert_token_counts.sum(dim=1).tolist() == [tokens * top_k] * CONFIG["num_hidden_layers"]
        assert len(result.losses) == TRAIN.local_steps


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_clients_start_from_their_own_adapters(zero_stage):
    """bf16 keeps fp32 master copies, at ZeRO 0 where DeepSpeed's safe_set_full_fp32_param
    cannot reach them too: each client must train from its loaded adapters, within bf16's
    rounding of the fp32 loop (trained from the wrong start, 1.3 apart at ZeRO 0 before the fix)."""
    model = _model()
    pristine = copy.deepcopy(model)
    engine = ClientEngine(model, dataclasses.replace(TRAIN, precision="bf16"), DeepSpeedConfig(zero_stage=zero_stage))
    for client in (3, 4):
        start, batches = _adapters(pristine, client), _batches(client)
        got = engine.train(start, ModelSetting(4, 4), batches).adapters
        want = _reference(pristine, start, 4, batches)
        assert relative_difference(got, want) < 5e-2, client  # measured 0.024 at both stages


def test_base_weights_stay_frozen():
    model = _model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    engine = ClientEngine(model, TRAIN, DeepSpeedConfig(zero_stage=0))
    engine.train(_adapters(model, 5), ModelSetting(4, 4), _batches(5, 2))
    after = engine.model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert expert_token_counts(engine.model).shape == (2, 8)


def test_pseudo_gradients_work_at_every_zero_stage(tmp_path):
    """PG runs as tensor hooks, so ZeRO 2 (which takes p.grad during backward) gets it too; in
    weight space it reads the factors inside the block's backward, where ZeRO-3 has gathered
    them even when every tensor is partitioned ("3p": persistence threshold 0)."""
    from pipeline.algorithms import ModelInfo, build_strategy
    from pipeline.config import Tier
    from pipeline.model.routing import enable_routing_modulation, moe_blocks, set_record_routing

    tier = Tier(0, "low", 0.25, 1, 4, 1.0)
    results = {}
    stages = {0: DeepSpeedConfig(zero_stage=0), 2: DeepSpeedConfig(zero_stage=2),
              3: DeepSpeedConfig(zero_stage=3), "3p": _zero3(tmp_path, 0)}
    for stage, ds in stages.items():
        model = _model()
        enable_routing_modulation(model, 6)
        set_record_routing(model, True)
        strategy = build_strategy("ubsmoe", {}, ModelInfo(2, 8, 4, 4, 8.0), [tier])
        strategy.init_state(_adapters(model, 7))
        engine = ClientEngine(model, TRAIN, ds)
        plan = strategy.plan(0, 1, tier)
        strategy.configure_model(engine.model, plan)
        batches = _batches(7, 1)
        result = engine.train(plan.adapters, ModelSetting(1, 4), batches,
                              extra_loss=lambda m: strategy.extra_loss(m, plan))
        results[stage] = result
        unused = result.expert_token_counts[0] == 0
        assert unused.any()
        key = next(k for k in result.adapters if "layers.0.mlp.lora_down_A" in k)
        moved = (result.adapters[key] - plan.adapters[key]).flatten(1).abs().sum(1)
        assert torch.all(moved[unused] > 0), stage  # experts no token used still learn
        assert len(moe_blocks(engine.model)) == 2
    _assert_same(results[2].adapters, results[0].adapters, rtol=1e-5, atol=1e-5)
    assert relative_difference(results[3].adapters, results[0].adapters) <= 1e-5
    assert relative_difference(results["3p"].adapters, results[0].adapters) <= 1e-5


def _zero3(tmp_path, persistence):
    """ZeRO-3; persistence threshold 0 partitions every tensor, DeepSpeed's default (1e5
    elements) keeps all of this tiny model's tensors whole after their first gather."""
    if persistence is None:
        return DeepSpeedConfig(zero_stage=3)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence}}))
    return DeepSpeedConfig(zero_stage=3, config=str(path))


@pytest.mark.parametrize("persistence", [0, None])
def test_zero3_client_matches_zero0(tmp_path, persistence):
    """Adapters in and out, a base delta, an extra loss that reads adapters outside a forward,
    and an evaluation forward on engine.module: ZeRO 3 as ZeRO 0."""
    from pipeline.model import HeteroMoEBlock, lora_base_weights, set_base_delta

    gen = torch.Generator().manual_seed(11)
    deltas = {k: 0.05 * torch.randn(w.shape, generator=gen) for k, w in lora_base_weights(_model()).items()}

    def penalty(m):  # reads adapter parameters between forward passes, as hetlora's does
        return 0.1 * sum((p ** 2).sum() for n, p in m.named_parameters() if n.endswith("lora_B"))

    engines = {stage: ClientEngine(_model(), TRAIN, ds) for stage, ds in
               ((0, DeepSpeedConfig(zero_stage=0)), (3, _zero3(tmp_path, persistence)))}
    z3 = engines[3].model
    assert all(getattr(m, "_z3_leaf", False) for m in z3.modules() if isinstance(m, HeteroMoEBlock))
    if persistence == 0:
        assert all(p.numel() == 0 for p in z3.parameters())  # partitioned between forward passes
    probe = _batches(9, 1)[0]
    results, logits = {}, {}
    for stage, engine in engines.items():
        set_base_delta(engine.model, deltas)
        results[stage] = [engine.train(_adapters(_model(), c), ModelSetting(k, r), _batches(c), extra_loss=penalty)
                          for c, k, r in ((1, 4, 4), (2, 2, 2))]
        engine.load_adapters(results[stage][0].adapters)
        engine.use(ModelSetting(4, 4))
        engine.model.eval()
        with torch.no_grad():
            logits[stage] = engine.model(**probe).logits
    for got, want in zip(results[3], results[0]):
        # Not bitwise: ZeRO-3 gathers into flat buffers and the CPU kernels then sum in another
        # order (first-step gradients differ by ~4e-7 relative); Adam amplifies that a little.
        assert relative_difference(got.adapters, want.adapters) <= 1e-5
        assert torch.equal(got.expert_token_counts, want.expert_token_counts)
        assert got.losses == pytest.approx(want.losses, rel=1e-5)
    torch.testing.assert_close(logits[3], logits[0], rtol=1e-5, atol=1e-5)
    # The delta is in the weights ZeRO-3 trains on: without it the model differs.
    set_base_delta(z3, {})
    with torch.no_grad():
        assert (z3(**probe).logits - logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("zero_stage, method", [(0, None), (3, None), (0, "ubsmoe")])
def test_activation_checkpointing_recomputes_each_layer_and_changes_no_bit(zero_stage, method):
    """Checkpointing buys memory with a second forward per layer in backward: the layers must
    run twice as often, and what the client returns (adapters, routed-token counts, losses)
    must be the same bits. UB-SMoE observes every expert projection's backward and must not
    see the recomputation; ZeRO-3 gathers parameters again for it."""
    from pipeline.algorithms import ModelInfo, build_strategy
    from pipeline.config import Tier
    from pipeline.model.routing import enable_routing_modulation, set_record_routing

    results, calls = {}, {}
    for on in (False, True):
        model = _model()
        kwargs, setting = {}, ModelSetting(2, 4)
        if method:
            tier = Tier(0, "low", 0.25, 1, 4, 1.0)
            enable_routing_modulation(model, 6)
            set_record_routing(model, True)
        start = _adapters(model, 3)
        if method:
            strategy = build_strategy(method, {}, ModelInfo(2, 8, 4, 4, 8.0), [tier])
            strategy.init_state(start)
            plan = strategy.plan(0, 1, tier)
        engine = ClientEngine(model, TRAIN, DeepSpeedConfig(zero_stage=zero_stage))
        if method:
            strategy.configure_model(engine.model, plan)
            start, setting = plan.adapters, ModelSetting(plan.top_k, plan.lora_rank)
            kwargs = dict(extra_loss=lambda m: strategy.extra_loss(m, plan),
                          after_backward=lambda m: strategy.after_backward(m, plan))
        count = [0]
        engine.model.model.layers[1].self_attn.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        results[on] = engine.train(start, setting, _batches(3), checkpointing=on, **kwargs)
        calls[on] = count[0]
        assert engine.model.is_activation_checkpointing == on
    assert calls == {False: TRAIN.local_steps, True: 2 * TRAIN.local_steps}
    off, on = results[False], results[True]
    assert off.adapters.keys() == on.adapters.keys()
    for k in off.adapters:
        assert torch.equal(off.adapters[k], on.adapters[k]), k
    assert torch.equal(off.expert_token_counts, on.expert_token_counts)
    assert off.losses == on.losses


def test_calibration_gradients_are_the_same_bits_under_activation_checkpointing():
    """FedSmoothLoRA's calibration pass hooks every projection's forward, which a checkpointed
    layer runs twice: only the first pass's hooks may count."""
    from pipeline.engine.calibration import weight_gradients

    grads = {}
    for on in (False, True):
        engine = ClientEngine(_model(), TRAIN, DeepSpeedConfig(zero_stage=0))
        engine.set_checkpointing(on)
        grads[on] = weight_gradients(engine, ModelSetting(4, 4), _batches(5, 2))
    assert grads[True].keys() == grads[False].keys() and any("mlp" in k for k in grads[True])
    for k in grads[False]:
        assert torch.equal(grads[True][k], grads[False][k]), k
