"""OLMoE with our heterogeneous top-k MoE block and LoRA adapters: plain PyTorch, no federation."""
from pipeline.model.adapters import (adapter_parameters, adapter_state, expert_token_counts,
                                     init_adapter_state, is_adapter_name, is_expert_adapter,
                                     load_adapter_state, reset_expert_token_counts, set_lora_rank,
                                     set_lora_scale, set_top_k)
from pipeline.model.base_delta import lora_base_weights, set_base_delta
from pipeline.model.build import build_model, load_model, patch_olmoe
from pipeline.model.export import merge_adapters, save_merged
from pipeline.model.flops import flops_per_token
from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock, Routing
from pipeline.model.setting import ModelSetting, apply_setting, set_activation_checkpointing

__all__ = [
    "load_model", "build_model", "patch_olmoe", "set_top_k", "set_lora_rank", "set_lora_scale",
    "adapter_parameters", "adapter_state", "load_adapter_state", "init_adapter_state",
    "is_adapter_name", "is_expert_adapter", "expert_token_counts", "reset_expert_token_counts",
    "merge_adapters", "save_merged", "HeteroMoEBlock", "LoRALinear",
    "Routing", "flops_per_token", "lora_base_weights", "set_base_delta", "ModelSetting", "apply_setting",
    "set_activation_checkpointing",
]
