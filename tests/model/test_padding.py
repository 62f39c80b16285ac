"""Padding is not a token: the MoE blocks route real tokens only, so appending pads to a batch
(right padding, or left padding with its position ids) changes no routed count, no routing
statistic, no method state computed from them, and no gradient beyond fp32 rounding."""
import copy

import pytest
import torch

from pipeline.algorithms import ModelInfo, build_strategy
from pipeline.algorithms import routing_math as rm
from pipeline.config import Tier
from pipeline.model import build_model, expert_token_counts, patch_olmoe, reset_expert_token_counts
from pipeline.model.routing import enable_routing_modulation, moe_blocks, selection_bias, set_record_routing
from tests.conftest import relative_difference

from .conftest import SMALL_OLMOE

INFO = ModelInfo(2, 8, 4, 2, 4.0)
TIER = Tier(0, "low", 0.5, 2, 2, 1.0)
LENGTHS = (7, 12, 5, 9)


def _model():
    model = patch_olmoe(build_model(SMALL_OLMOE, seed=0), lora_rank=2, lora_alpha=4.0)
    enable_routing_modulation(model, 6)
    set_record_routing(model, True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _batch(width, left):
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 64, (n,), generator=gen) for n in LENGTHS]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols], labels[i, cols] = s, 1, s
        labels[i, cols.start] = -100  # a left pad would predict it
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)


def _step(model, method, batch):
    m = copy.deepcopy(model)
    strategy = build_strategy(method, {}, INFO, [TIER])
    strategy.init_state({})
    plan = strategy.plan(0, 1, TIER)
    strategy.configure_model(m, plan)
    for block in moe_blocks(m):
        block.top_k = TIER.top_k
    reset_expert_token_counts(m)
    loss = m(**batch).loss
    loss.backward()
    strategy.after_backward(m, plan)
    stats = [rm.routing_statistics(b.last_routing.indices, b.last_routing.probs) for b in moe_blocks(m)]
    return {"loss": loss.detach(), "counts": expert_token_counts(m),
            "stats": torch.stack([torch.cat(tuple(s)) for s in stats]),
            "grads": {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
            "bias": selection_bias(m) if method == "smoe-lb" else None}


@pytest.mark.parametrize("method", ["ubsmoe", "smoe-lb"])
def test_appended_padding_changes_no_count_statistic_or_gradient(method):
    model = _model()
    tight = _step(model, method, _batch(max(LENGTHS), left=False))
    real = sum(LENGTHS)
    assert torch.all(tight["counts"].sum(1) == real * TIER.top_k)  # pads of the tight batch left out too
    for width, left in ((max(LENGTHS) + 9, False), (max(LENGTHS), True), (max(LENGTHS) + 20, True)):
        padded = _step(model, method, _batch(width, left))
        where = f"width {width}, left={left}"
        assert torch.equal(padded["counts"], tight["counts"]), where
        torch.testing.assert_close(padded["stats"], tight["stats"], rtol=1e-5, atol=1e-6, msg=where)
        torch.testing.assert_close(padded["loss"], tight["loss"], rtol=1e-6, atol=0, msg=where)
        assert padded["grads"].keys() == tight["grads"].keys()
        for k, want in tight["grads"].items():  # per tensor, so that small ones (phi) count
            assert relative_difference({k: padded["grads"][k]}, {k: want}) <= 1e-5, (where, k)
        if method == "smoe-lb":  # its loss-free bias moves by the step's counts
            assert torch.equal(padded["bias"], tight["bias"]) and tight["bias"].abs().sum() > 0


def test_pads_get_no_moe_output_and_an_unmasked_batch_routes_every_token():
    model = _model()
    batch = _batch(max(LENGTHS) + 3, left=False)
    block = moe_blocks(model)[0]
    seen = {}
    block.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    with torch.no_grad():
        model(**batch)
        pads = batch["attention_mask"] == 0
        assert torch.all(seen["out"][pads] == 0) and torch.all(seen["out"][~pads].abs().sum(-1) > 0)
        reset_expert_token_counts(model)
        model(input_ids=batch["input_ids"])  # no mask: every position is a token
    assert expert_token_counts(model)[0].sum() == batch["input_ids"].numel() * block.top_k
