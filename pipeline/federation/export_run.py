"""`fedmoe export RUN --format peft|merged [--tier NAME] --out DIR`, and the one way a run's
model is put at an export setting, which `checkpoint.save_merged` (final/model) uses too.

A tier's export carries its setting: the merged model's config has the tier's
`num_experts_per_tok`, a peft adapter is written at the tier's LoRA rank and scale and its card
and `export.json` name the top-k to load the base with. A method that merges into the backbone
(FLoRA, FedEx-LoRA, FedSmoothLoRA, FRLoRA) changed the base weights: its merged export holds
them, its peft export writes them beside the adapter as `base/` (a plain Hugging Face model).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from pipeline.config import Config, Tier
from pipeline.errors import UserError
from pipeline.model import ModelSetting, apply_setting, load_adapter_state, save_merged, set_base_delta
from pipeline.model.peft_format import save_peft_adapter

FORMATS = ("peft", "merged")
CARD, INFO = "README.md", "export.json"
console = Console()


def export_setting(strategy, tier: Tier | None, k_max: int, rank: int) -> tuple[dict, ModelSetting]:
    """The adapters and model setting of an export: a tier's evaluation setting, or (no tier)
    the full top-k and rank, as final/model has always been written."""
    if tier is None:
        return strategy.eval_adapters(None), strategy.setting(k_max, rank)
    return strategy.eval_adapters(tier), strategy.eval_setting(tier)


def place_model(model, strategy, adapters: dict, setting: ModelSetting, load_adapters=None, use=None) -> None:
    """The model at the export's adapters, base delta, method hooks and setting; `load_adapters`
    and `use` are a ClientEngine's when one holds the model (default: on the plain model)."""
    (load_adapters or (lambda a: load_adapter_state(model, a)))(adapters)
    set_base_delta(model, strategy.base_delta())
    strategy.configure_model(model, None)  # its hooks, as at evaluation
    (use or (lambda s: apply_setting(model, s)))(setting)


def routing_dropped(model) -> list[str]:
    """The learned routing terms in use that a plain Hugging Face OLMoE cannot hold."""
    from pipeline.model.adapters import moe_blocks

    names = []
    for name in ("phi", "selection_bias"):
        if any(getattr(b, name, None) is not None and bool(getattr(b, name).detach().abs().max() > 0)
               for b in moe_blocks(model)):
            names.append(name)
    return names


def _peft_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:  # noqa: BLE001 - an absent peft changes only a line of the card
        return None


def check_export_args(run_dir: Path, fmt: str, tier_name: str | None, out: Path) -> Config:
    """Everything that needs no weights, before anything loads or is written."""
    from pipeline.federation import rundir

    if fmt not in FORMATS:
        raise UserError(f"--format: must be peft or merged, got {fmt!r}")
    cfg = rundir.run_config(run_dir)
    names = [t.name for t in cfg.tiers]
    if tier_name is not None and tier_name not in names:
        raise UserError(f"--tier: {run_dir} has no tier {tier_name!r} (its tiers: {', '.join(names)})")
    rundir.check_out(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: directory exists and is not empty; choose another or remove it")
    return cfg


def export_run(run_dir: Path, fmt: str, tier_name: str | None, out: Path, command: str) -> Path:
    from pipeline.eval.model_card import render_card
    from pipeline.federation.inputs import resolve_source
    from pipeline.federation.restore import restore_run

    cfg = check_export_args(run_dir, fmt, tier_name, out)
    run = restore_run(run_dir, cfg, "export")
    source, meta, model, tokenizer, tiers, strategy = (run.source, run.meta, run.model, run.tokenizer,
                                                       run.tiers, run.strategy)
    tier = next((t for t in tiers if t.name == tier_name), None)
    adapters, setting = export_setting(strategy, tier, model.config.num_experts_per_tok, cfg.model.lora.rank)
    place_model(model, strategy, adapters, setting)

    merges_base = bool(strategy.base_delta())
    source_model = resolve_source(cfg.model.source)
    if Path(source_model).is_dir():
        source_model = str(Path(source_model).resolve())
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "merged":
            save_merged(model, tmp, tokenizer=tokenizer)
            base = str(out.resolve())
        else:
            base = str((out / "base").resolve()) if merges_base else source_model
            save_peft_adapter(model, tmp, base_model=base)  # at the setting's rank and scale
            if merges_base:  # the base weights the adapter was trained on
                save_merged(model, tmp / "base", tokenizer=tokenizer, lora=False)
        info = {"format": fmt, "tier": tier_name, "top_k": setting.top_k, "lora_rank": setting.lora_rank,
                "base_model": base, "source_model": source_model, "method": cfg.algorithm.name,
                "round": meta["round"], "checkpoint": str(source), "needs_merged_base": merges_base and fmt == "peft",
                "routing_dropped": routing_dropped(model), "peft_version": _peft_version()}
        (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / CARD).write_text(render_card(run_dir, info, tiers, command))
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    what = "a peft adapter" + (" and its merged base (base/)" if info["needs_merged_base"] else "")
    console.print(f"{out}: {what if fmt == 'peft' else 'a merged Hugging Face model'} of {run_dir} "
                  f"(round {meta['round']}, top-k {setting.top_k}, LoRA rank {setting.lora_rank}), card {out / CARD}")
    for name in info["routing_dropped"]:
        console.print(f"note: the run's learned routing `{name}` has no place in a plain OLMoE and is left out")
    return out
