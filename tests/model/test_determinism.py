"""Same seed, same bits at more than one thread: the MoE block's backward is order-independent.

The model tests run at one thread (conftest); this one runs at two on purpose, because the
kernels whose float accumulation order varies (CPU index_put_ with accumulate) only split
work across threads above a size threshold (about 32k elements), which this batch exceeds.
"""
import torch

from pipeline.model import adapter_parameters, build_model, patch_olmoe


def _block_grads(block, x, g):
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    block(x).backward(g)
    return [x.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]


def test_block_backward_is_bitwise_repeatable_at_two_threads(tiny_olmoe_config):
    config = {**tiny_olmoe_config, "hidden_size": 128, "intermediate_size": 64, "num_experts": 16,
              "num_experts_per_tok": 8, "num_hidden_layers": 1}
    model = patch_olmoe(build_model(config, seed=0), lora_rank=4, lora_alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    block = model.model.layers[0].mlp
    x = torch.randn(8, 128, 128, generator=gen)  # 1024 tokens x top-8: 8192 routed rows
    g = torch.randn(8, 128, 128, generator=gen)
    torch.set_num_threads(2)  # restored by the conftest fixture
    want = _block_grads(block, x, g)
    assert len(want) == 1 + 4  # the input and the four expert-LoRA factors (the router is frozen)
    for _ in range(4):
        got = _block_grads(block, x, g)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
