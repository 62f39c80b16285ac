"""DMR modulation and the selection-only bias inside HeteroMoEBlock, against direct computations."""
import torch

from pipeline.model import build_model, patch_olmoe, set_top_k
from pipeline.model.routing import (enable_routing_modulation, moe_blocks, selection_bias,
                                    set_record_routing, set_selection_bias)

from .conftest import SMALL_OLMOE

CONFIG = SMALL_OLMOE


def _block():
    model = patch_olmoe(build_model(CONFIG, seed=0), lora_rank=2, lora_alpha=4.0)
    return model, moe_blocks(model)[0]


def test_zero_phi_and_zero_bias_leave_routing_unchanged():
    model, block = _block()
    x = torch.randn(10, 32)
    want = block.route(x)
    enable_routing_modulation(model, n_candidates=6)
    set_selection_bias(model, torch.zeros(2, 8))
    got = block.route(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dmr_shifts_only_candidate_logits_and_phi_gets_gradients():
    model, block = _block()
    enable_routing_modulation(model, n_candidates=3)
    with torch.no_grad():
        block.phi.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(5, 32)
    logits = block.router_logits(x)
    cand = logits.topk(3, dim=-1).indices
    shifted = logits + torch.zeros_like(logits).scatter(1, cand, 1.0) * block.phi
    probs = torch.softmax(shifted, -1)
    w, idx = probs.topk(block.top_k, -1)
    got_idx, got_w, got_p = block.route(x)
    torch.testing.assert_close(got_p, probs)
    assert torch.equal(got_idx, idx)
    torch.testing.assert_close(got_w, w)
    got_w.sum().backward()
    assert block.phi.grad is not None and block.phi.grad.abs().sum() > 0
    assert "model.layers.0.mlp.phi" in dict(model.named_parameters())


def test_selection_bias_picks_experts_but_gates_stay_unbiased():
    model, block = _block()
    bias = torch.zeros(2, 8)
    bias[0, 7] = 10.0  # force expert 7 into every token's top-k
    set_selection_bias(model, bias)
    set_top_k(model, 2)
    x = torch.randn(6, 32)
    idx, w, probs = block.route(x)
    assert (idx == 7).any(dim=1).all()
    torch.testing.assert_close(w, probs.gather(1, idx))
    assert torch.equal(selection_bias(model), bias)


def test_routing_records_for_gradient_hooks():
    model, block = _block()
    set_record_routing(model, True)
    model(torch.randint(1, 64, (2, 5)))
    assert block.last_routing.indices.shape == (10, 4) and block.last_routing.probs.shape == (10, 8)
    set_record_routing(model, False)
    assert block.last_routing is None
