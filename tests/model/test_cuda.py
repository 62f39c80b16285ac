"""The block's accelerator paths (grouped_mm in bf16, the loop in fp32); skipped without CUDA."""
import copy

import pytest
import torch

from pipeline.model import adapter_parameters, build_model, patch_olmoe
from tests.model.reference import dense_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
              max_position_embeddings=128, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rank", [8, 3])
def test_cuda_block_matches_dense_reference(dtype, tol, rank):
    model = patch_olmoe(build_model(CONFIG, seed=0), lora_rank=rank, attention_lora=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    block = model.model.layers[0].mlp.to("cuda", dtype)
    x = torch.randn(4, 33, 128, generator=gen).to("cuda", dtype)

    x1 = x.clone().requires_grad_(True)
    got = block(x1)
    got.float().square().sum().backward()
    grads = {n: p.grad.float().clone() for n, p in block.named_parameters() if p.requires_grad}
    block.zero_grad()

    ref_block = copy.deepcopy(block).float()  # the same (rounded) weights, computed in fp32
    x2 = x.float().clone().requires_grad_(True)
    expected = dense_reference(ref_block, x2.reshape(-1, 128)).reshape(x.shape)
    expected.square().sum().backward()

    def close(a, b):
        torch.testing.assert_close(a.float(), b, atol=tol * b.abs().max().item(), rtol=tol)

    close(got, expected)
    close(x1.grad, x2.grad)
    for n, p in ref_block.named_parameters():
        if p.requires_grad:
            close(grads[n], p.grad)


def test_cuda_zero_adapters_match_hf_logits():
    hf = build_model(CONFIG, seed=1).cuda()
    ours = patch_olmoe(copy.deepcopy(hf), lora_rank=8)
    ids = torch.randint(1, 128, (2, 40), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_cuda_activation_checkpointing_keeps_gradients_and_lowers_peak_memory():
    """On the GPU path (grouped_mm in bf16): the same loss and adapter gradients (up to CUDA's
    atomic-add order) with checkpointing, and a lower peak while training at a size where the
    saved activations dominate."""
    from pipeline.model import set_activation_checkpointing

    config = dict(CONFIG, num_hidden_layers=8, max_position_embeddings=512)  # plan: 0.27x the activations
    ids = torch.randint(1, 128, (8, 512), device="cuda")
    results = {}
    for on in (False, True):
        model = patch_olmoe(build_model(config, seed=0), lora_rank=8).to("cuda", torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        set_activation_checkpointing(model, on)
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float() for n, p in adapter_parameters(model).items()}
        results[on] = (loss.item(), grads, torch.cuda.max_memory_allocated() - base)
        del model, loss
        torch.cuda.empty_cache()
    (loss_off, g_off, peak_off), (loss_on, g_on, peak_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, rel=1e-3)
    for n in g_off:
        torch.testing.assert_close(g_on[n], g_off[n], atol=3e-2 * g_off[n].abs().max().item(), rtol=3e-2)
    assert peak_on < 0.6 * peak_off, (peak_on, peak_off)
