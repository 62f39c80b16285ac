"""flops_per_token against a hand count."""
import pytest

from pipeline.model import flops_per_token

CFG = dict(vocab_size=100, hidden_size=8, intermediate_size=4, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, num_experts=6, num_experts_per_tok=3)


def test_hand_count():
    f = flops_per_token(CFG, top_k=2, lora_rank=1, seq_len=5)
    # Per layer: q 8->8, k 8->4, v 8->4, o 8->8: 2*(64+32+32+64) = 384; scores: 2 * 2*(2 heads*4)*ctx 3 = 96.
    assert f["attention"] == 2 * (384 + 96)
    assert f["router"] == 2 * (2 * 8 * 6)
    # Experts: 2 routed x (8->8 gate_up: 128, 4->8 down: 64) x 2 FLOPs.
    assert f["experts"] == 2 * (2 * (2 * 8 * 8 + 2 * 4 * 8))
    # LoRA r=1: attention 2*((8+8)+(8+4)+(8+4)+(8+8)) = 112; experts 2 x 2*((8+8)+(4+8)) = 112.
    assert f["attention_adapters"] == 2 * 112 and f["expert_adapters"] == 2 * 112
    assert f["adapters"] == 448
    assert f["lm_head"] == 2 * 8 * 100
    fwd = 960 + 192 + 768 + 448 + 1600
    assert f["forward"] == fwd
    # Frozen 1x (projections 768, router, experts, lm_head), scores 2x, adapters 2x.
    assert f["backward"] == (768 + 192 + 768 + 1600) + 2 * 192 + 2 * 448
    assert f["train"] == f["forward"] + f["backward"]


def test_fractional_top_k_and_options():
    half = flops_per_token(CFG, top_k=1.5, lora_rank=2, seq_len=5)
    three = flops_per_token(CFG, top_k=3, lora_rank=2, seq_len=5)
    assert half["experts"] == pytest.approx(three["experts"] / 2)
    assert half["expert_adapters"] == pytest.approx(three["expert_adapters"] / 2)
    none = flops_per_token(CFG, 3, 2, 5, expert_lora=False, attention_lora=False)
    assert none["adapters"] == 0 and none["forward"] == three["forward"] - three["adapters"]
    full = flops_per_token(CFG, 3, 2, 5, expert_lora=False, attention_lora=False, trainable="all")
    assert full["backward"] == 2 * none["forward"]
    with pytest.raises(ValueError):
        flops_per_token(CFG, 3, 2, 5, trainable="router")
