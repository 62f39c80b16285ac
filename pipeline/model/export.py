"""From a patched model back to plain Hugging Face artifacts: a merged model, a peft adapter."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
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


def merge_adapters(model: OlmoeForCausalLM) -> OlmoeForCausalLM:
    """A plain HF model with s * B @ A (at the active rank) merged into the base weights.

    Works on a deep copy; the input model is unchanged. The merged model routes with the
    config's top-k (`num_experts_per_tok`), as any HF OLMoE does. Under ZeRO-3 the copy is
    taken from the gathered weights (a collective: every rank of the group calls this).
    """
    with gathered(model.parameters()):
        return _merge(model)


@torch.no_grad()
def _merge(model: OlmoeForCausalLM) -> OlmoeForCausalLM:
    merged = copy.deepcopy(model)
    _drop_zero3_state(merged)
    for layer in merged.model.layers:
        block = layer.mlp
        if isinstance(block, HeteroMoEBlock):
            _warn_if_routing_variant(block)
            if block.has_lora:
                block.experts.gate_up_proj += block.expert_delta("gate_up").to(block.experts.gate_up_proj.dtype)
                block.experts.down_proj += block.expert_delta("down").to(block.experts.down_proj.dtype)
            layer.mlp = _plain_moe_block(block)
        attn = layer.self_attn
        for name, child in list(attn.named_children()):
            if isinstance(child, LoRALinear):
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


def save_merged(model: OlmoeForCausalLM, out_dir: str | Path | None, tokenizer=None) -> None:
    """`merge_adapters` + `save_pretrained` (safetensors); `from_pretrained(out_dir)` reloads it.

    Under ZeRO-3 every rank of the group must call it; those given `out_dir=None` only take
    part in gathering the weights.
    """
    with gathered(model.parameters()):
        if out_dir is None:
            return
        merged = _merge(model)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def export_peft_attention(model: OlmoeForCausalLM, out_dir: str | Path) -> None:
    """The attention LoRA (at the active rank) in peft's adapter format.

    `PeftModel.from_pretrained(plain_hf_model, out_dir)` loads it. Expert LoRA is not part of
    it (peft can only express it by materialising W + BA for every expert); merge instead.
    The tensors are written directly under peft's key names rather than through a PeftModel,
    which would need a second copy of the whole model.
    """
    from peft import LoraConfig  # imported here: peft takes a while to import, and only this needs it

    tensors, targets, ranks, alphas = {}, set(), set(), set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a, b = module.factors()
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().clone()
            targets.add(name.rsplit(".", 1)[-1])
            ranks.add(module.active_rank)
            alphas.add(module.scale * module.active_rank)  # peft scales by alpha / r
    if not tensors:
        raise ValueError("model has no attention LoRA to export")
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"attention LoRA with mixed ranks {sorted(ranks)} or alphas {sorted(alphas)}")
    config = LoraConfig(r=ranks.pop(), lora_alpha=alphas.pop(), target_modules=sorted(targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
