"""A model setting: what the patched model runs at for one client or one evaluation.

Experts per token, the active LoRA rank and its scale, and the routing options a method sets
(a selection bias). `ClientEngine.use` applies it for training, evaluation and export alike.
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
