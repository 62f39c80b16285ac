"""Analytic FLOPs per token of an OLMoE forward / backward with our adapters.

Counting rules:
- Only matmuls count, 2 FLOPs per multiply-add; norms, softmax, activations, RoPE, the routing
  weights and the embedding lookup are ignored (a few percent at most).
- Per layer: attention projections q, k, v, o (`2 * in * out` each); attention scores
  `Q K^T` and `P V`, each `2 * heads * head_dim * ctx` with `ctx = (seq_len + 1) / 2`, the mean
  causal context; router `2 * H * E`; experts `top_k * (2 * H * 2I + 2 * I * H)`.
- Adapters: a rank-r LoRA on an `in -> out` matmul costs `2 * r * (in + out)` per routed
  token; expert LoRA counts `top_k` times, on gate_up (H -> 2I) and down (I -> H).
- `lm_head`: `2 * H * V` per token.
- Backward: a matmul with a frozen weight costs 1x its forward FLOPs (input gradients only);
  with a trainable weight 2x (input and weight gradients); attention scores 2x (both operands
  are activations). Input gradients are assumed to flow through every layer, as they do when
  any adapter sits in the first layer. `trainable="all"` makes every weight trainable.
- `top_k` may be fractional: pass the measured mean of routed experts per token,
  `counts.sum() / tokens` of a layer, to count what actually ran.
"""
from __future__ import annotations

from transformers import OlmoeConfig


def flops_per_token(config: dict | OlmoeConfig, top_k: float, lora_rank: int, seq_len: int,
                    expert_lora: bool = True, attention_lora: bool = True,
                    trainable: str = "adapters") -> dict[str, float]:
    """FLOPs per token by part (`attention`, `router`, `experts`, `adapters`, `lm_head`) and in
    total (`forward`, `backward`, `train` = forward + backward); see the module docstring."""
    if trainable not in ("adapters", "all"):
        raise ValueError(f"trainable must be 'adapters' or 'all', got {trainable!r}")
    if isinstance(config, dict):
        config = OlmoeConfig(**{"eos_token_id": None, **config})
    H = config.hidden_size
    I = config.intermediate_size
    E = config.num_experts
    V = config.vocab_size
    L = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    r = lora_rank
    ctx = (seq_len + 1) / 2

    proj_shapes = [(H, q_out), (H, kv_out), (H, kv_out), (q_out, H)]
    attn_proj = sum(2 * i * o for i, o in proj_shapes)
    attn_scores = 2 * (2 * heads * head_dim * ctx)
    router = 2 * H * E
    experts = top_k * (2 * H * 2 * I + 2 * I * H)
    attn_lora = sum(2 * r * (i + o) for i, o in proj_shapes) if attention_lora else 0
    expert_lora_flops = top_k * 2 * r * ((H + 2 * I) + (I + H)) if expert_lora else 0
    lm_head = 2 * H * V

    parts = {
        "attention": L * (attn_proj + attn_scores),
        "router": L * router,
        "experts": L * experts,
        "attention_adapters": L * attn_lora,
        "expert_adapters": L * expert_lora_flops,
        "lm_head": lm_head,
    }
    parts["adapters"] = parts["attention_adapters"] + parts["expert_adapters"]
    forward = parts["attention"] + parts["router"] + parts["experts"] + parts["adapters"] + lm_head

    frozen = 2.0 if trainable == "all" else 1.0
    backward = (frozen * (L * attn_proj + parts["router"] + parts["experts"] + lm_head)
                + 2.0 * L * attn_scores + 2.0 * parts["adapters"])
    return {**parts, "forward": forward, "backward": backward, "train": forward + backward}
