"""peft adapters a command reads: `model.init_adapter` (a run's start) and `eval --adapter`,
with what does not fit reported as one line naming the field or flag (exit 2)."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from pipeline.errors import UserError
from pipeline.model.peft_format import (AdapterMismatch, PeftAdapter, adapter_state_at_scale, check_fits,
                                        read_peft_adapter)


def read_adapter(path: str | Path, what: str) -> PeftAdapter:
    try:
        return read_peft_adapter(path)
    except AdapterMismatch as exc:
        raise UserError(f"{what}: {exc}") from None


def start_adapters(model, strategy, cfg, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """The run's initial adapters with the LoRA of `model.init_adapter` in place of the fresh
    ones (routing vectors such as DMR's phi stay fresh). The adapter must adapt exactly the
    model's LoRA pieces at `model.lora.rank`; its `s * B @ A` is kept at the scale the run
    evaluates its full rank at (B rescaled when the alphas differ)."""
    adapter = read_adapter(cfg.model.init_adapter, "model.init_adapter")
    try:
        check_fits(adapter, model, "model.init_adapter")
    except AdapterMismatch as exc:
        raise UserError(str(exc)) from None
    rank = cfg.model.lora.rank
    setting = strategy.setting(model.config.num_experts_per_tok, rank)
    scale = setting.lora_scale if setting.lora_scale is not None else cfg.model.lora.alpha / rank
    return {**fresh, **adapter_state_at_scale(adapter, scale)}
