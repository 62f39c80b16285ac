"""Top-k is capacity for what fine-tuning stores: the property the knowledge suite relies on.

Adapters trained at top-k 4 under the frozen router spread new facts over the experts each
token activates; evaluated at a lower top-k, the same adapters lose the part held by the
dropped experts (bench/results-facts.txt measures it on the shipped model and suite)."""

import torch

from pipeline.model.adapters import adapter_parameters, set_top_k
from pipeline.model.build import build_model, patch_olmoe

SIDE, VALUES = 12, 8  # 144 two-token keys, each mapped to one of 8 value tokens


def _accuracy_by_top_k() -> dict[int, float]:
    vocab = 2 * SIDE + VALUES + 2
    config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
                  max_position_embeddings=8, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):  # patch_olmoe draws the LoRA A init from the global RNG
        torch.manual_seed(0)
        model = patch_olmoe(build_model(config, seed=0), lora_rank=4, lora_alpha=8.0)  # expert + attention LoRA
    gen = torch.Generator().manual_seed(0)
    keys = torch.cartesian_prod(torch.arange(2, 2 + SIDE), torch.arange(2 + SIDE, 2 + 2 * SIDE))
    values = torch.randint(2 * SIDE + 2, vocab, (len(keys),), generator=gen)
    params = list(adapter_parameters(model).values())
    opt = torch.optim.Adam(params, lr=1e-2)
    set_top_k(model, 4)
    model.train()
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(input_ids=keys).logits[:, -1], values)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    accuracy = {}
    for k in (4, 2, 1):
        set_top_k(model, k)
        with torch.no_grad():
            accuracy[k] = float((model(input_ids=keys).logits[:, -1].argmax(-1) == values).float().mean())
    return accuracy


def test_facts_learned_at_top_k_4_are_partly_lost_at_lower_top_k():
    acc = _accuracy_by_top_k()
    assert acc[4] >= 0.95, acc  # learned
    assert acc[2] < acc[4] and acc[1] <= acc[4] - 0.15, acc  # lost with the dropped experts
