"""HeteroMoEBlock against the Hugging Face model and against a dense per-expert reference."""
import copy

import pytest
import torch

from pipeline.model import (adapter_parameters, build_model, expert_token_counts, patch_olmoe,
                            reset_expert_token_counts, set_top_k)
from pipeline.model import moe_block as moe_block_module
from tests.model.reference import dense_reference


def _ids(vocab=64, shape=(3, 11), seed=0):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_zero_adapters_match_hf_logits(tiny_olmoe_config, norm_topk_prob):
    hf = build_model({**tiny_olmoe_config, "norm_topk_prob": norm_topk_prob}, seed=3)
    assert hf.model.layers[0].mlp.gate.weight.abs().sum() > 0  # routing is not a tie
    ours = patch_olmoe(copy.deepcopy(hf), lora_rank=4, lora_alpha=8.0)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _force_path(monkeypatch, path):
    """cpu_loop: the per-expert CPU kernel; grouped_mm: the kernel other devices use (it runs
    on CPU too); autograd: the plain fallback where grouped_mm cannot run."""
    if path != "cpu_loop":
        monkeypatch.setattr(moe_block_module, "_use_cpu_loop", lambda x: False)
    if path == "autograd":
        monkeypatch.setattr(moe_block_module, "_can_use_grouped_mm", lambda *a: False)


@pytest.mark.parametrize("path,rank", [("cpu_loop", 4), ("grouped_mm", 4), ("grouped_mm", 3),
                                       ("autograd", 4)])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_block_matches_dense_reference_with_adapters(tiny_olmoe_config, norm_topk_prob, top_k,
                                                     path, rank, monkeypatch):
    _force_path(monkeypatch, path)
    model = build_model({**tiny_olmoe_config, "norm_topk_prob": norm_topk_prob}, seed=0)
    patch_olmoe(model, lora_rank=rank, lora_alpha=8.0, attention_lora=False)
    _randomise_adapters(model)
    block = model.model.layers[0].mlp
    block.top_k = top_k
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))

    x1 = x.clone().requires_grad_(True)
    got = block(x1)
    got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    block.zero_grad()

    x2 = x.clone().requires_grad_(True)
    expected = dense_reference(block, x2.reshape(-1, 32)).reshape(x.shape)
    expected.square().sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    assert set(grads) == {"lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"}
    for n, p in block.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_base_loop_fallback_matches_grouped_mm(tiny_olmoe_config, monkeypatch):
    model = patch_olmoe(build_model(tiny_olmoe_config, seed=0), expert_lora=False)
    block = model.model.layers[1].mlp
    x = torch.randn(1, 13, 32)
    with torch.no_grad():
        expected = block(x)
        monkeypatch.setattr(moe_block_module, "_can_use_grouped_mm", lambda *a: False)
        got = block(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_adapters(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _randomise_adapters(model)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    adapters = adapter_parameters(model)
    assert adapters, "no adapters"
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_counts_and_set_top_k(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=2)
    ids = _ids(shape=(2, 7))
    n_tokens = ids.numel()
    for k in (2, 8):
        set_top_k(model, k)
        reset_expert_token_counts(model)
        with torch.no_grad():
            model(ids)
            model(ids)
        counts = expert_token_counts(model)
        assert counts.dtype == torch.float64 and counts.shape == (2, 8)
        assert counts.sum(1).tolist() == [2.0 * n_tokens * k] * 2
    if True:  # k = num_experts: every expert sees every token
        assert counts.tolist() == [[2.0 * n_tokens] * 8] * 2
    reset_expert_token_counts(model)
    assert expert_token_counts(model).sum() == 0
    for bad in (0, 9, 2.5, -1):
        with pytest.raises(ValueError):
            set_top_k(model, bad)


def test_counts_not_doubled_by_activation_checkpointing(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=2)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # the newer name where it exists, so no deprecation warning
    model.train()
    set_top_k(model, 3)
    ids = _ids(shape=(2, 5))
    model(ids, labels=ids).loss.backward()
    assert expert_token_counts(model).sum(1).tolist() == [ids.numel() * 3.0] * 2


def test_routing_record_and_router_logits(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=2)
    block = model.model.layers[0].mlp
    ids = _ids(shape=(2, 5))
    with torch.no_grad():
        model(ids)
    assert block.last_routing is None  # off unless asked
    block.record_routing = True
    set_top_k(model, 3)
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
    routing = block.last_routing
    assert routing.indices.shape == (10, 3) and routing.probs.shape == (10, 8)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(10))
    assert torch.equal(routing.indices, routing.probs.topk(3, dim=-1).indices)
    assert len(out.router_logits) == 2 and out.aux_loss is not None  # HF aux loss still works


def test_bf16_runs_and_keeps_integer_counts(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=2).to(torch.bfloat16)
    ids = _ids(shape=(1, 6))
    model(ids, labels=ids).loss.backward()
    counts = expert_token_counts(model)
    assert model.model.layers[0].mlp.token_counts.dtype == torch.long
    assert counts.sum(1).tolist() == [6.0 * 4] * 2
