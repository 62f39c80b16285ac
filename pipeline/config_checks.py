"""Validation of a loaded config: every value in range and every named file usable, before anything
is written. A failure is a `ConfigError` naming the dotted field (`tiers.0.top_k`, `train.lr`).

Model-independent; `config.resolve_tiers` checks what needs the model's expert count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config

EVAL_MODES = ("choice", "generate")
DATA_SOURCES = ("offline", "facts", "commonsense")
CHECKPOINTING = ("auto", "on", "off")  # train.activation_checkpointing


def check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: Config) -> None:
    check(cfg.seed >= 0, "seed", "must be >= 0")
    check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    check(cfg.model.lora.rank >= 1, "model.lora.rank", "must be >= 1")
    check(cfg.model.lora.alpha > 0, "model.lora.alpha", "must be > 0")
    check(cfg.model.lora.experts or cfg.model.lora.attention, "model.lora",
          "at least one of experts / attention must be true")
    if cfg.model.init_adapter is not None:
        _check_adapter_dir(cfg.model.init_adapter)
    check(len(cfg.tiers) >= 1, "tiers", "at least one tier is required")
    names = [t.name for t in cfg.tiers]
    check(len(set(names)) == len(names), "tiers", f"tier names must be unique, got {names}")
    for i, tier in enumerate(cfg.tiers):
        check(0 < tier.budget <= 1, f"tiers.{i}.budget", f"must be in (0, 1], got {tier.budget}")
        check(tier.share > 0, f"tiers.{i}.share", f"must be > 0, got {tier.share}")
        check(tier.top_k is None or tier.top_k >= 1, f"tiers.{i}.top_k", f"must be >= 1, got {tier.top_k}")
        check(tier.lora_rank is None or 1 <= tier.lora_rank <= cfg.model.lora.rank,
              f"tiers.{i}.lora_rank", f"must be in [1, model.lora.rank={cfg.model.lora.rank}]")
        check(tier.ranks >= 1, f"tiers.{i}.ranks", f"must be >= 1, got {tier.ranks}")
        check(tier.ep_size >= 1 and tier.ranks % tier.ep_size == 0, f"tiers.{i}.ep_size",
              f"must be a divisor of tiers.{i}.ranks={tier.ranks}, got {tier.ep_size}")
        check(tier.gpu_memory_gb > 0, f"tiers.{i}.gpu_memory_gb", f"must be > 0, got {tier.gpu_memory_gb}")
        check(tier.speed > 0, f"tiers.{i}.speed", f"must be > 0, got {tier.speed}")
    fed = cfg.federation
    check(fed.rounds >= 1, "federation.rounds", f"must be >= 1, got {fed.rounds}")
    check(fed.clients >= 1, "federation.clients", f"must be >= 1, got {fed.clients}")
    check(1 <= fed.clients_per_round <= fed.clients, "federation.clients_per_round",
          f"must be in [1, federation.clients={fed.clients}], got {fed.clients_per_round}")
    check(1 <= fed.min_clients <= fed.clients_per_round, "federation.min_clients",
          f"must be in [1, clients_per_round={fed.clients_per_round}], got {fed.min_clients}")
    check(fed.master_port is None or 1024 <= fed.master_port <= 65000, "federation.master_port",
          f"must be in [1024, 65000], got {fed.master_port}")
    check(fed.collective_timeout >= 0, "federation.collective_timeout", "must be >= 0 (0: no limit)")
    check(fed.placement in ("tier", "balanced", "queue"), "federation.placement",
          f"must be tier, balanced or queue, got {fed.placement!r}")
    check(fed.mode in ("sync", "async"), "federation.mode", f"must be sync or async, got {fed.mode!r}")
    check(fed.clock in ("virtual", "wall"), "federation.clock", f"must be virtual or wall, got {fed.clock!r}")
    check(fed.concurrency is None or 1 <= fed.concurrency <= fed.clients, "federation.concurrency",
          f"must be in [1, federation.clients={fed.clients}], got {fed.concurrency}")
    check(0 <= fed.jitter < 1, "federation.jitter", f"must be in [0, 1), got {fed.jitter}")
    tr = cfg.train
    check(tr.local_steps >= 1, "train.local_steps", f"must be >= 1, got {tr.local_steps}")
    check(tr.batch_size >= 1, "train.batch_size", f"must be >= 1, got {tr.batch_size}")
    check(tr.lr > 0, "train.lr", f"must be > 0, got {tr.lr}")
    check(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
    check(tr.max_length >= 8, "train.max_length", f"must be >= 8, got {tr.max_length}")
    check(tr.precision in ("fp32", "bf16"), "train.precision", f"must be fp32 or bf16, got {tr.precision!r}")
    check(tr.activation_checkpointing in CHECKPOINTING, "train.activation_checkpointing",
          f"must be one of {', '.join(CHECKPOINTING)}, got {tr.activation_checkpointing!r}")
    check(tr.on_divergence in ("warn", "stop"), "train.on_divergence",
          f"must be warn or stop, got {tr.on_divergence!r}")
    check(tr.divergence_factor > 1, "train.divergence_factor", f"must be > 1, got {tr.divergence_factor}")
    check(tr.divergence_evals >= 1, "train.divergence_evals", f"must be >= 1, got {tr.divergence_evals}")
    check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
          f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.zero_stage == 3:
        big = [i for i, t in enumerate(cfg.tiers) if t.ep_size > 1]
        check(not big, f"tiers.{big[0] if big else 0}.ep_size",
              "must be 1 with deepspeed.zero_stage=3: expert parallelism uses DeepSpeed's MoE groups, "
              "which DeepSpeed refuses at ZeRO stage 3")
    if cfg.deepspeed.config is not None:
        _check_deepspeed_json(cfg.deepspeed.config)
    data = cfg.data
    check(data.source in DATA_SOURCES, "data.source", f"must be one of {', '.join(DATA_SOURCES)}, got {data.source!r}")
    if data.source == "commonsense":
        check(bool(data.path), "data.path", "required when data.source is commonsense")
    check(data.n_train_per_family >= 1, "data.n_train_per_family", "must be >= 1")
    check(data.n_eval_per_family >= 1, "data.n_eval_per_family", "must be >= 1")
    check(data.dirichlet_alpha > 0, "data.dirichlet_alpha", f"must be > 0, got {data.dirichlet_alpha}")
    check(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    check(cfg.eval.mode in EVAL_MODES, "eval.mode", f"must be choice or generate, got {cfg.eval.mode!r}")
    check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {cfg.eval.max_new_tokens}")
    check(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")


def _check_adapter_dir(path: str) -> None:
    """A peft adapter directory with its two files; rank and targets are checked against the model."""
    check(Path(path).is_dir(), "model.init_adapter", f"no such directory: {path}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        check((Path(path) / name).is_file(), "model.init_adapter",
              f"{path} has no {name} (a peft LoRA adapter directory has both)")


def _check_deepspeed_json(path: str) -> None:
    """Readable, JSON, an object: the engine reads it only after the run directory exists."""
    check(Path(path).is_file(), "deepspeed.config", f"file not found: {path}")
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"deepspeed.config: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed.config: {path}: not valid JSON ({exc})") from None
    check(isinstance(value, dict), "deepspeed.config", f"{path}: must hold a JSON object, got {type(value).__name__}")
