"""Typed experiment config: dataclasses, YAML load, dotted `--set` overrides (validation: config_checks).

The YAML tree mirrors the dataclasses below one to one. Unknown keys, wrong types and values
out of range raise `ConfigError` naming the dotted field (`tiers.0.top_k`, `train.lr`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config_checks import EVAL_MODES, check, validate  # EVAL_MODES: re-exported
from pipeline.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class LoraConfig:
    rank: int = 8  # r_max: the rank every sparse-method client trains; low-rank tiers slice it
    alpha: float = 16.0
    experts: bool = True  # per-expert LoRA on gate_up and down projections
    attention: bool = True  # LoRA on q/k/v/o


@dataclass
class ModelConfig:
    source: str = "assets/tiny-olmoe"  # local Hugging Face directory or hub id
    dtype: str = "float32"  # weights of the frozen base: float32 | bfloat16
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_adapter: str | None = None  # a peft LoRA adapter directory the run starts from (docs/export.md)


@dataclass
class TierConfig:
    name: str = "t4"
    budget: float = 1.0  # share of K_max experts per token, in (0, 1]
    share: float = 1.0  # relative share of clients in this tier
    top_k: int | None = None  # default floor(K_max * budget), at least 1
    lora_rank: int | None = None  # default max(1, round(rank * budget)); used by low-rank methods
    ranks: int = 1  # MPI ranks (GPUs) per client group of this tier; one group = one DeepSpeed engine
    ep_size: int = 1  # expert parallelism in a group: each rank holds experts/ep_size experts (divides ranks and the expert count)
    gpu_memory_gb: float = 80.0  # memory of each of its GPUs (GiB): `fedmoe plan` checks the estimate fits
    speed: float = 1.0  # async: hardware speed; a client's virtual duration is steps * step cost / speed (docs/async.md)


@dataclass
class FederationConfig:
    clients: int = 8
    clients_per_round: int = 4
    rounds: int = 10
    min_clients: int = 1  # a round with fewer accepted updates fails
    master_port: int | None = None  # under MPI: group i's torch.distributed port is this + i (None: a free port)
    collective_timeout: float = 1800.0  # seconds a cross-group collective may wait before aborting the job; 0: never
    placement: str = "tier"  # tier | balanced | queue: which client group trains which client (docs/placement.md)
    mode: str = "sync"  # sync (rounds) | async (clients report on a clock, docs/async.md)
    clock: str = "virtual"  # async: virtual (seeded durations) | wall (real arrival order)
    concurrency: int | None = None  # async: clients in flight at once (default clients_per_round)
    jitter: float = 0.0  # async: a client's duration times a seeded factor in [1 - jitter, 1 + jitter]
    replay: str | None = None  # async, virtual clock: the durations a run recorded (its metrics.jsonl or directory)


@dataclass
class AlgorithmConfig:
    name: str = "smoe"
    options: dict = field(default_factory=dict)  # method-specific, validated by the strategy


@dataclass
class TrainConfig:
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    max_length: int = 64
    precision: str = "fp32"  # fp32 | bf16
    # Recompute each decoder layer in backward instead of keeping its activations: auto (only
    # for a client whose tier the memory plan says does not fit its GPU without it), on, off.
    # YAML reads a bare on/off as true/false, which mean the same here.
    activation_checkpointing: str | bool = "auto"
    deterministic: bool | None = None  # deterministic kernels; None: on for CPU, off on CUDA
    on_divergence: str = "warn"  # warn | stop: what the divergence guard does (pipeline/eval/divergence.py)
    divergence_factor: float = 1.5  # a tier diverges when its eval loss exceeds the base model's by this factor
    divergence_evals: int = 2  # ... (or its accuracy falls below chance) for this many evaluations in a row

    def __post_init__(self):
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "on" if self.activation_checkpointing else "off"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    config: str | None = None  # path to a DeepSpeed JSON whose keys override the generated ones


@dataclass
class DataConfig:
    source: str = "offline"  # offline (skills suite) | facts (knowledge suite) | commonsense (LLM-Adapters json / hub id)
    path: str | None = None  # for source=commonsense
    eval_path: str | None = None  # for source=commonsense; default: a held-out slice of `path`
    n_train_per_family: int = 400
    n_eval_per_family: int = 50
    dirichlet_alpha: float = 0.5  # non-IID split over task families; large = IID


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every N rounds (and always after the last)
    batch_size: int = 64
    mode: str = "choice"  # choice (option log-likelihood) | generate (greedy decoding + answer extraction)
    max_new_tokens: int = 8  # generate mode: tokens decoded per prompt


@dataclass
class CheckpointConfig:
    every: int = 1  # rounds between checkpoints (the last round is always saved)
    keep: int = 2  # complete checkpoints kept on disk
    save_merged: bool = True  # final/model: adapters merged into a plain HF model directory


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # rich progress bars and per-round tables


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tiers: list[TierConfig] = field(default_factory=list)
    federation: FederationConfig = field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (default: configs/default.yaml), apply `a.b.c=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, OSError) as exc:  # binary, unreadable
        reason = exc.strerror if isinstance(exc, OSError) else exc.reason
        raise ConfigError(f"{path}: cannot be read as YAML text ({reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (numbers, booleans, lists); list items by index."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        index = _index(node, last, key)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")


def _child(node: Any, part: str, dotted: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, dotted)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: parent is not a section")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"--set {dotted}: no such field")
        node[part] = {}
    return node[part]


def _index(node: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {dotted}: index {part} out of range (list has {len(node)})")
    return int(part)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    label = where or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, bool) and bool in args:
            return value
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-3` as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")  # a bug in this file, not user input


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


@dataclass(frozen=True)
class Tier:
    """A resource tier resolved against the model: what a client of this tier computes."""

    index: int
    name: str
    budget: float
    top_k: int
    lora_rank: int
    share: float


def resolve_tiers(cfg: Config, num_experts: int, k_max: int) -> list[Tier]:
    """K_c = floor(K_max * budget) and r_c = round(r_max * budget) unless given (ALGORITHMS.md 1)."""
    tiers = []
    for i, t in enumerate(cfg.tiers):
        top_k = t.top_k if t.top_k is not None else max(1, math.floor(k_max * t.budget + 1e-9))
        check(top_k <= num_experts, f"tiers.{i}.top_k",
              f"{top_k} exceeds the model's {num_experts} experts")
        check(num_experts % t.ep_size == 0, f"tiers.{i}.ep_size",
              f"must divide the model's {num_experts} experts, got {t.ep_size}")
        rank = t.lora_rank if t.lora_rank is not None else max(1, round(cfg.model.lora.rank * t.budget))
        tiers.append(Tier(i, t.name, t.budget, top_k, rank, t.share))
    return tiers
