import pytest
import torch

# A small OLMoE shared by the block-level tests (2 layers, 8 experts, top-4).
SMALL_OLMOE = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
                   max_position_embeddings=64, eos_token_id=None, pad_token_id=0)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP barriers make
    # each small op wait for a time slice (a 1 ms forward becomes 1 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
