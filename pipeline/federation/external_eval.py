"""`fedmoe eval --model DIR [--adapter DIR] [RUN | --config F]`: any Hugging Face OLMoE
directory, with or without a peft LoRA adapter, on a run's (or a config's) held-out set and
tiers, scored exactly as `fedmoe eval` scores a run, so the two stand in one table.

The model is patched like a run's and the adapter read into our layout (pipeline.model.peft_format;
its agreement with peft itself is tested), so the same forward and scorer serve both. Each tier is
evaluated at the experts per token the run evaluates it at (its own top-k; the full top-k for the
methods whose tiers differ by LoRA rank) and at the adapter's full rank: an adapter made elsewhere
has no rank ordering to slice. The tiers' top-k come from the run's model config (`model.source`),
so an export saved at one tier's top-k is still evaluated at every tier's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import Config, LoraConfig, resolve_tiers
from pipeline.errors import UserError
from pipeline.model import ModelSetting, adapter_parameters
from pipeline.federation.peft_inputs import read_adapter
from pipeline.model.peft_format import AdapterMismatch, adapter_state_at_scale, check_fits


class ExternalModel:
    """The part of a Strategy that evaluate_tiers reads: no base delta, no hooks, the tier's
    top-k at the adapter's rank, the same adapters for every tier."""

    def __init__(self, adapters: dict, rank: int, full_top_k: int | None):
        self.adapters, self.rank, self.full_top_k = adapters, rank, full_top_k

    def base_delta(self) -> dict:
        return {}

    def configure_model(self, model, plan) -> None:
        pass

    def eval_setting(self, tier) -> ModelSetting:
        return ModelSetting(self.full_top_k or tier.top_k, self.rank)

    def eval_adapters(self, tier=None) -> dict:
        return self.adapters


def _k_max(cfg: Config, fallback: int) -> int:
    """The run's model's experts per token, which its tiers' top-k derive from."""
    from transformers import AutoConfig

    from pipeline.federation.inputs import resolve_source

    try:
        return int(AutoConfig.from_pretrained(resolve_source(cfg.model.source)).num_experts_per_tok)
    except (OSError, ValueError, UserError):  # the run's model is not here: the given model's
        return fallback


def evaluate_model(cfg: Config, model_dir: Path, adapter_dir: Path | None, top_ks: list[int] | None = None,
                   mode: str | None = None) -> list[dict]:
    from rich.console import Console

    from pipeline.algorithms import STRATEGIES
    from pipeline.algorithms.hetero_rank import HeteroRankStrategy
    from pipeline.engine.determinism import use_deterministic_kernels
    from pipeline.eval.metrics import eval_tables
    from pipeline.federation.evaluation import Evaluated, check_top_ks, evaluate_tiers
    from pipeline.federation.inputs import load_federated_data, load_patched_model

    if not Path(model_dir).is_dir():
        raise UserError(f"--model {model_dir}: no such directory")
    adapter = read_adapter(adapter_dir, "--adapter") if adapter_dir is not None else None
    # Without an adapter a rank-1 LoRA with B = 0 adds exactly nothing.
    lora = (LoraConfig(rank=adapter.rank, alpha=adapter.scale * adapter.rank, experts=adapter.experts,
                       attention=bool(adapter.attention_modules)) if adapter else LoraConfig(rank=1, alpha=1.0))
    use_deterministic_kernels(cfg.train.deterministic)
    try:
        model, tokenizer = load_patched_model(dataclasses.replace(cfg.model, source=str(model_dir), lora=lora))
    except UserError as exc:
        raise UserError(str(exc).replace("model.source: ", f"--model {model_dir}: ", 1)) from None
    state = {n: p.detach().float().clone().zero_() for n, p in adapter_parameters(model).items()}
    if adapter is not None:
        try:  # attention projections the adapter leaves out keep B = 0
            check_fits(adapter, model, "--adapter", partial=True)
        except AdapterMismatch as exc:
            raise UserError(str(exc)) from None
        state.update(adapter_state_at_scale(adapter, adapter.scale))
    mcfg = model.config
    if top_ks:
        check_top_ks(top_ks, mcfg.num_experts)
    k_max = _k_max(cfg, mcfg.num_experts_per_tok)
    tiers = resolve_tiers(cfg, mcfg.num_experts, k_max)
    full = k_max if issubclass(STRATEGIES[cfg.algorithm.name], HeteroRankStrategy) else None
    data = load_federated_data(cfg, tokenizer)
    label = f"{model_dir}" + (f" + {adapter_dir}" if adapter_dir else "")
    rows = evaluate_tiers(Evaluated(model, Path(adapter_dir or model_dir)), ExternalModel(state, lora.rank, full),
                          tiers, data, cfg.eval, None, mode=mode, top_ks=top_ks)
    for row in rows:
        row["model"] = label
        if adapter is None:
            row["lora_rank"] = None  # no LoRA: the rank-1 zero placeholder is no part of the result
    for table in eval_tables(rows, f"{label}, {rows[0]['mode']} mode", data.chance):
        Console().print(table)
    return rows
