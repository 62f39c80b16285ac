"""Evaluating a global model per tier (every round of a run, and `fedmoe eval`).

`evaluate_round` logs a round's evaluation; `evaluate_tiers` puts the model at each tier's
setting (top-k, LoRA rank, adapters) and scores the held-out set in the configured mode;
`evaluate_run` does it for a saved checkpoint, at the tiers' own top-k or at any top-k the user names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.algorithms import Strategy
from pipeline.config import EVAL_MODES, Config, EvalConfig, Tier
from pipeline.errors import UserError
from pipeline.eval.metrics import eval_tables
from pipeline.eval.modes import evaluate_examples
from pipeline.federation import restore, rundir
from pipeline.federation.assembly import Federation, evaluates
from pipeline.federation.inputs import FederatedData, resolve_source
from pipeline.model import ModelSetting, apply_setting, load_adapter_state, set_base_delta

console = Console()


def evaluate_round(fed: Federation, round_: int) -> list[dict]:
    """The round's `eval` events, one per tier, with its training cost and balance (world rank 0)."""
    if not evaluates(fed):  # other ranks hold the same state; rank 0 evaluates it
        return []
    rows = evaluate_tiers(fed.engine, fed.strategy, fed.tiers, fed.data, fed.cfg.eval, round_)
    if not fed.writes:
        return []
    for row in rows:
        row.update(fed.tier_stats.get(row["tier"], {}))  # the latest round's training cost and balance
        fed.metrics.log("eval", **row)
    return rows


def evaluate_tiers(engine, strategy: Strategy, tiers: list[Tier], data: FederatedData, eval_cfg: EvalConfig,
                   round_: int, mode: str | None = None, top_ks: list[int] | None = None,
                   progress=None) -> list[dict]:
    """The global model at each tier's setting (its top-k, rank and adapters) on the held-out suite.

    `engine`: a ClientEngine, or any holder of `model` with its `load_adapters` and `use`
    (`Evaluated`). `top_ks`: evaluate each tier at each of these top-k instead of its own
    (`fedmoe eval --top-k`); `mode` replaces eval.mode; `progress()` is called after each evaluation.
    """
    mode = mode or eval_cfg.mode
    model = engine.model
    set_base_delta(model, strategy.base_delta())
    strategy.configure_model(model, None)
    rows = []
    for tier in tiers:
        setting = strategy.eval_setting(tier)
        rank = setting.lora_rank
        engine.load_adapters(strategy.eval_adapters(tier))
        for k in top_ks or [setting.top_k]:
            engine.use(dataclasses.replace(setting, top_k=k))
            scores = evaluate_examples(model, data.tokenizer, data.eval_examples, mode, eval_cfg.batch_size,
                                       eval_cfg.max_new_tokens)
            row = {"round": round_, "tier": tier.name, "top_k": k, "lora_rank": rank, "mode": mode,
                   "accuracy": scores["accuracy"], "loss": scores["loss"],
                   "format_failures": scores["format_failures"], "per_family": scores["per_family"],
                   "chance": data.chance}
            if "per_family_format_failures" in scores:
                row["per_family_format_failures"] = scores["per_family_format_failures"]
            rows.append(row)
            if progress is not None:
                progress()
    return rows


def evaluate_run(run_dir: Path, checkpoint_path: Path | None = None, top_ks: list[int] | None = None,
                 mode: str | None = None) -> list[dict]:
    """`fedmoe eval`: the latest intact checkpoint (the final state once a run finished), every tier at
    its own top-k or at each of `top_ks`, in `mode` (default: the run's eval.mode)."""
    run_dir = Path(run_dir)
    cfg = rundir.run_config(run_dir)
    if mode is not None and mode not in EVAL_MODES:
        raise UserError(f"--mode: must be choice or generate, got {mode!r}")
    if top_ks:  # checked against the model's config before the weights and data load
        check_top_ks(top_ks, model_num_experts(cfg))
    run = restore.restore_run(run_dir, cfg, "evaluate", checkpoint_path)
    source, meta, model, tiers, strategy, data = run.source, run.meta, run.model, run.tiers, run.strategy, run.data

    total = len(tiers) * len(top_ks or [None])
    with Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("eval", total=total)
        rows = evaluate_tiers(Evaluated(model, source), strategy, tiers, data, cfg.eval, meta["round"],
                              mode=mode, top_ks=top_ks, progress=lambda: bar.advance(task))
    for table in eval_tables(rows, f"{Path(source).name} of {run_dir}, {rows[0]['mode']} mode", data.chance):
        console.print(table)
    return rows


class Evaluated:
    """A model without a trainer (`fedmoe eval`), with the engine's `load_adapters` and `use`."""

    def __init__(self, model, source: Path):
        self.model, self.source = model, source

    def load_adapters(self, adapters) -> None:
        try:
            load_adapter_state(self.model, adapters)
        except ValueError as exc:
            raise UserError(f"{self.source}: {exc}") from None

    def use(self, setting: ModelSetting) -> None:
        apply_setting(self.model, setting)


def model_num_experts(cfg: Config) -> int:
    """The expert count from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    source = resolve_source(cfg.model.source)
    try:
        return int(AutoConfig.from_pretrained(source).num_experts)
    except (OSError, AttributeError) as exc:
        raise UserError(f"model.source: cannot read the expert count of {source!r}: {exc}") from None


def check_top_ks(top_ks: list[int], num_experts: int) -> None:
    for k in top_ks:
        if not 1 <= k <= num_experts:
            raise UserError(f"--top-k: must be in [1, {num_experts}] (the model's experts), got {k}")
