"""Load or build an OLMoE model and patch it with our MoE block and LoRA."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from pipeline.model.adapters import is_adapter_name
from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_model(source: str, dtype: torch.dtype = torch.float32) -> OlmoeForCausalLM:
    """A Hugging Face OLMoE checkpoint from a local directory or a hub id."""
    return OlmoeForCausalLM.from_pretrained(str(source), dtype=dtype)


def _as_config(config: dict | OlmoeConfig) -> OlmoeConfig:
    if isinstance(config, OlmoeConfig):
        return config
    config = dict(config)
    # The default eos id (50279) lies outside small test vocabularies and makes transformers warn.
    if "eos_token_id" not in config and config.get("vocab_size", 50304) <= 50279:
        config["eos_token_id"] = None
    return OlmoeConfig(**config)


def build_model(config: dict | OlmoeConfig, seed: int) -> OlmoeForCausalLM:
    """A randomly initialised OLMoE, deterministic in `seed`; the global RNG is left untouched.

    The routers get N(0, 0.02) weights from their own generator: some transformers versions
    init them to zeros, which makes every top-k a tie.
    """
    config = _as_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    return model.eval()


def patch_olmoe(model: OlmoeForCausalLM, lora_rank: int = 8, lora_alpha: float = 16.0,
                expert_lora: bool = True, attention_lora: bool = True,
                attention_modules: Sequence[str] = ATTENTION_MODULES) -> OlmoeForCausalLM:
    """In place: every `OlmoeSparseMoeBlock` becomes a `HeteroMoEBlock` on the same weights, the
    chosen attention projections become `LoRALinear`; base weights are frozen, adapters trainable.
    Every forward hands the attention mask to the MoE blocks, which route real tokens only.
    """
    if lora_rank < 1 and (expert_lora or attention_lora):
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    layers = model.model.layers
    if not all(isinstance(layer.mlp, OlmoeSparseMoeBlock) for layer in layers):
        raise ValueError("model is already patched (or is not an OLMoE model)")
    unknown = [m for m in attention_modules if not isinstance(getattr(layers[0].self_attn, m, None), nn.Linear)]
    if attention_lora and unknown:
        raise ValueError(f"attention_modules: no nn.Linear named {unknown[0]!r} in self_attn")

    model.requires_grad_(False)
    for layer in layers:
        layer.mlp = HeteroMoEBlock(layer.mlp, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                   expert_lora=expert_lora)
        if attention_lora:
            for name in attention_modules:
                base = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, LoRALinear(base, rank=lora_rank, alpha=lora_alpha))
    # Fresh modules start trainable; only the adapters must be.
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    model.model.register_forward_pre_hook(_hand_token_mask, with_kwargs=True)
    return model


def _hand_token_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder stack: its 2-D attention mask (1 = real token) to every
    MoE block. Pads then reach no routing count or statistic; with causal attention that masks
    them as keys, their (zero) MoE output changes no real token's. A module-level function so
    that a deep copy of the model hands the mask to its own blocks."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for layer in module.layers:
        if isinstance(layer.mlp, HeteroMoEBlock):
            layer.mlp.token_mask = real


# allenai/OLMoE-1B-7B-0924's config.json (6.9 B parameters, 1.3 B active); transformers'
# default OlmoeConfig differs (intermediate 2048), so scale tools build from this.
OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                   num_experts_per_tok=8, max_position_embeddings=4096, rope_theta=10000.0,
                   rms_norm_eps=1e-5, norm_topk_prob=False, clip_qkv=None, pad_token_id=1,
                   eos_token_id=50279, tie_word_embeddings=False)
