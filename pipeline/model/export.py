"""From a patched model back to a plain Hugging Face model: the adapters merged into the base
(the peft adapter format is pipeline.model.peft_format)."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock
from pipeline.model.partitioned import gathered


def _plain_moe_block(block: HeteroMoEBlock) -> OlmoeSparseMoeBlock:
    # Built without __init__ so that no second [E, 2I, H] expert tensor is allocated.
    plain = OlmoeSparseMoeBlock.__new__(OlmoeSparseMoeBlock)
    nn.Module.__init__(plain)
    plain.gate = block.gate
    plain.experts = block.experts
    return plain


def _warn_if_routing_variant(block: HeteroMoEBlock) -> None:
    # A plain HF OLMoE has no place for them, so the merged model routes without them.
    for name in ("phi", "selection_bias"):
        value = getattr(block, name, None)
        if value is not None and bool(value.detach().abs().max() > 0):
            warnings.warn(f"merge_adapters: the block's non-zero routing `{name}` is dropped; "
                          "the merged Hugging Face model routes with the plain router", stacklevel=3)


def merge_adapters(model: OlmoeForCausalLM, lora: bool = True) -> OlmoeForCausalLM:
    """A plain HF model with s * B @ A (at the active rank) merged into the base weights
    (`lora=False`: the base weights alone, with any base delta they hold).

    Works on a deep copy; the input model is unchanged. The merged model routes with the blocks'
    active top-k, written to its config (`num_experts_per_tok`), so `from_pretrained` of a saved
    copy routes as the patched model did. Under ZeRO-3 the copy is taken from the gathered
    weights (a collective: every rank of the group calls this).
    """
    with gathered(model.parameters()):
        return _merge(model, lora)


@torch.no_grad()
def _merge(model: OlmoeForCausalLM, lora: bool = True) -> OlmoeForCausalLM:
    merged = copy.deepcopy(model)
    _drop_zero3_state(merged)
    for layer in merged.model.layers:
        block = layer.mlp
        if isinstance(block, HeteroMoEBlock):
            _warn_if_routing_variant(block)
            block.gate.top_k = block.top_k
            merged.config.num_experts_per_tok = block.top_k
            if block.has_lora and lora:
                block.experts.gate_up_proj += block.expert_delta("gate_up").to(block.experts.gate_up_proj.dtype)
                block.experts.down_proj += block.expert_delta("down").to(block.experts.down_proj.dtype)
            layer.mlp = _plain_moe_block(block)
        attn = layer.self_attn
        for name, child in list(attn.named_children()):
            if isinstance(child, LoRALinear):
                if lora:
                    child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(attn, name, child.base)
    merged.requires_grad_(True)  # as from_pretrained would give it
    return merged


def _drop_zero3_state(model: nn.Module) -> None:
    """A deep copy of a ZeRO-3 module carries DeepSpeed's hooks and ids, which would fetch the
    original's partitions in a forward: a merged copy is a plain module."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks,
                      module._backward_pre_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, "__module__", "").startswith("deepspeed")]:
                del hooks[key]
        for name in [n for n in vars(module) if n.startswith("ds_") or n == "_z3_leaf"]:
            delattr(module, name)


def save_merged(model: OlmoeForCausalLM, out_dir: str | Path | None, tokenizer=None,
                lora: bool = True) -> None:
    """`merge_adapters` + `save_pretrained` (safetensors); `from_pretrained(out_dir)` reloads it.

    Under ZeRO-3 every rank of the group must call it; those given `out_dir=None` only take
    part in gathering the weights.
    """
    with gathered(model.parameters()):
        if out_dir is None:
            return
        merged = _merge(model, lora)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
