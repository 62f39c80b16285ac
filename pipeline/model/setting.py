"""A model setting: what the patched model runs at for one client or one evaluation.

Experts per token, the active LoRA rank and its scale, and the routing options a method sets
(a selection bias). `ClientEngine.use` applies it for training, evaluation and export alike.
Activation checkpointing, which changes memory and time but no result, is switched apart
(`set_activation_checkpointing`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.model.adapters import set_lora_rank, set_lora_scale, set_top_k
from pipeline.model.routing import set_selection_bias


@dataclass(frozen=True)
class ModelSetting:
    top_k: int  # experts per token
    lora_rank: int  # active LoRA rank: the first r components
    lora_scale: float | None = None  # a rank-independent LoRA scale (alpha = scale * r); None: alpha / r
    selection_bias: Tensor | None = None  # [layers, experts], added to the router's scores for selection


def apply_setting(model: nn.Module, setting: ModelSetting) -> None:
    set_top_k(model, setting.top_k)
    set_lora_rank(model, setting.lora_rank)
    set_lora_scale(model, setting.lora_scale)
    set_selection_bias(model, setting.selection_bias)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing per decoder layer, through transformers' own switch, in torch's
    non-reentrant mode: the gradients are the same bits, and a recomputed layer's routing repeats
    the first pass, which the MoE block does not count twice (moe_block._in_backward)."""
    # transformers renamed gradient_* to activation_checkpointing_* (the old names warn);
    # earlier 5.x releases have only the old ones.
    new = hasattr(type(model), "activation_checkpointing_enable")
    if on == (model.is_activation_checkpointing if new else model.is_gradient_checkpointing):
        return
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # transformers also hooks the embeddings' output to require grad, which only the
        # reentrant mode needs; it would add a backward through the first layer's inputs.
        model.disable_input_require_grads()
    elif new:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
