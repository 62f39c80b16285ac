"""The adapter dict: naming, state round trips, init, active rank."""
import copy

import pytest
import torch

from pipeline.model import (LoRALinear, adapter_parameters, adapter_state, build_model,
                            init_adapter_state, is_expert_adapter, load_adapter_state, patch_olmoe,
                            set_lora_rank)


def _random_state(model, seed, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * std for k, v in adapter_state(model).items()}


def test_patch_names_and_shapes(tiny_olmoe):
    names_before = {n for n, _ in tiny_olmoe.named_parameters()}
    model = patch_olmoe(tiny_olmoe, lora_rank=4)
    params = dict(model.named_parameters())
    # HF base names kept for router and experts; attention bases sit under `.base`.
    for n in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
              "model.layers.1.mlp.experts.down_proj", "model.layers.1.self_attn.q_proj.base.weight"):
        assert n in params and not params[n].requires_grad
    assert isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    adapters = adapter_parameters(model)
    assert list(adapters) == [n for n, _ in model.named_parameters() if n in adapters]  # order
    assert all(p.requires_grad for p in adapters.values())
    E, H, I, r = 8, 32, 16, 4
    assert adapters["model.layers.0.mlp.lora_gate_up_A"].shape == (E, r, H)
    assert adapters["model.layers.0.mlp.lora_gate_up_B"].shape == (E, 2 * I, r)
    assert adapters["model.layers.0.mlp.lora_down_A"].shape == (E, r, I)
    assert adapters["model.layers.0.mlp.lora_down_B"].shape == (E, H, r)
    assert adapters["model.layers.0.self_attn.k_proj.lora_A"].shape == (r, H)
    assert adapters["model.layers.0.self_attn.k_proj.lora_B"].shape == (16, r)  # 2 kv heads x 8
    expert = [n for n in adapters if is_expert_adapter(n)]
    assert len(expert) == 2 * 4 and all(adapters[n].shape[0] == E for n in expert)
    assert not is_expert_adapter("model.layers.0.self_attn.q_proj.lora_A")
    assert len(adapters) == 2 * (4 + 4 * 2)
    assert names_before - {n.replace(".base.", ".") for n in params} == set()
    with pytest.raises(ValueError):
        patch_olmoe(model)


def test_patch_options(tiny_olmoe_config):
    model = patch_olmoe(build_model(tiny_olmoe_config, 0), lora_rank=2, expert_lora=False,
                        attention_modules=("q_proj", "v_proj"))
    names = list(adapter_parameters(model))
    assert not any(is_expert_adapter(n) for n in names)
    assert {n.split(".")[-2] for n in names} == {"q_proj", "v_proj"}
    model = patch_olmoe(build_model(tiny_olmoe_config, 0), attention_lora=False)
    assert all(is_expert_adapter(n) for n in adapter_parameters(model))


def test_state_round_trip_and_errors(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=4)
    state = _random_state(model, 0)
    load_adapter_state(model, state)
    back = adapter_state(model)
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], state[k])
    back[next(iter(back))].add_(1.0)  # a detached clone: the model is untouched
    assert torch.equal(adapter_state(model)[next(iter(back))], state[next(iter(back))])

    key = "model.layers.1.mlp.lora_down_B"
    with pytest.raises(ValueError, match=key):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="bogus"):
        load_adapter_state(model, {**state, "bogus.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match=key):
        load_adapter_state(model, {**state, key: torch.zeros(8, 32, 3)})
    assert torch.equal(adapter_state(model)[key], state[key])  # a failed load changes nothing


def test_init_adapter_state(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=4)
    before = adapter_state(model)
    s1, s2, s3 = (init_adapter_state(model, seed) for seed in (7, 7, 8))
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())  # model untouched
    assert list(s1) == list(adapter_parameters(model))
    for k in s1:
        assert torch.equal(s1[k], s2[k]) and s1[k].dtype == torch.float32
        if k.endswith("B"):
            assert s1[k].abs().sum() == 0
        else:  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
            bound = 1 / s1[k].shape[-1] ** 0.5
            assert s1[k].abs().max() <= bound and s1[k].abs().max() > 0.8 * bound
            assert not torch.equal(s1[k], s3[k])
    load_adapter_state(model, s1)
    # Zero B: the adapted model computes the base model.
    ids = torch.randint(1, 64, (2, 6))
    base = copy.deepcopy(tiny_olmoe)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_set_lora_rank_equals_truncated_model(tiny_olmoe_config):
    base = build_model(tiny_olmoe_config, 0)
    full = patch_olmoe(copy.deepcopy(base), lora_rank=4, lora_alpha=8.0)
    state = _random_state(full, 3)
    load_adapter_state(full, state)
    set_lora_rank(full, 2)

    small = patch_olmoe(copy.deepcopy(base), lora_rank=2, lora_alpha=8.0)
    truncated = {}
    for k, v in state.items():
        if k.endswith("_A"):
            truncated[k] = v[:, :2] if is_expert_adapter(k) else v[:2]
        else:
            truncated[k] = v[..., :2]
    load_adapter_state(small, truncated)
    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, small(ids).logits, atol=1e-5, rtol=1e-5)
        set_lora_rank(full, 4)
        assert not torch.allclose(full(ids).logits, small(ids).logits, atol=1e-4)
    for bad in (0, 5):
        with pytest.raises(ValueError):
            set_lora_rank(full, bad)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_odd_ranks_backward(tiny_olmoe_config, rank):
    """Ranks that break grouped_mm's 16-byte stride rule are padded, not refused."""
    model = patch_olmoe(build_model(tiny_olmoe_config, 0), lora_rank=8)
    load_adapter_state(model, _random_state(model, 1))
    set_lora_rank(model, rank)
    ids = torch.randint(1, 64, (2, 5))
    model(ids, labels=ids).loss.backward()
    for n, p in adapter_parameters(model).items():
        grad = p.grad[:, :rank] if n.endswith("_A") and is_expert_adapter(n) else p.grad
        assert grad.abs().sum() > 0, n
