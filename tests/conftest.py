"""Fixtures shared across test folders."""
import pytest


@pytest.fixture
def tiny_olmoe_config() -> dict:
    """A few-kilobyte OLMoE: 2 layers, 8 experts, top-4, vocabulary 64."""
    return dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
                max_position_embeddings=64, eos_token_id=None, pad_token_id=0)


@pytest.fixture
def tiny_olmoe(tiny_olmoe_config):
    """A random-init tiny `OlmoeForCausalLM` (seed 0, non-zero routers), not patched."""
    from pipeline.model import build_model
    return build_model(tiny_olmoe_config, seed=0)
