"""Which checkpoint `resume`, `eval` and `export` start from, and whether it fits the run's config.

A damaged checkpoint (checkpoint.damage: a file its manifest does not match) is passed over for
the previous one, with one warning line. A checkpoint that is intact but does not fit the run's
config.yaml (an edited LoRA rank, another algorithm) or holds NaN/Inf is a UserError (exit 2):
resuming again would fail the same way every time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.errors import UserError


def choose(run_dir: Path, announce: bool, remedy: str) -> Path | None:
    """The newest intact checkpoint of `run_dir` (None: it has none); `remedy` ends the error
    when every checkpoint is damaged."""
    def warn(line: str) -> None:
        if announce:  # under MPI every rank chooses (the same one); one of them says so
            print(f"fedmoe: warning: {line}", file=sys.stderr, flush=True)

    return checkpoint.verified_checkpoint(run_dir, warn, remedy)


def given(path: Path) -> Path:
    """`eval --checkpoint PATH`: that checkpoint if it is intact, else a UserError."""
    if not (path / checkpoint.META).is_file() and not (path / checkpoint.MANIFEST).is_file():
        raise UserError(f"{path}: --checkpoint: not a checkpoint directory (no {checkpoint.META})")
    why = checkpoint.damage(path)
    if why:
        raise UserError(f"{path}: damaged checkpoint ({why}); pass another --checkpoint, "
                        "or none for the newest intact one")
    return path


@dataclass
class Restored:
    """A run's model and strategy at one of its checkpoints (`fedmoe eval`, `fedmoe export`)."""

    source: Path  # the checkpoint
    meta: dict[str, Any]  # its state.json
    model: Any
    tokenizer: Any
    tiers: list
    strategy: Any
    data: Any


def restore_run(run_dir: Path, cfg: Config, what: str, path: Path | None = None) -> Restored:
    """The checkpoint `path` (`--checkpoint`), else the newest intact one of `run_dir`, loaded into
    a model and strategy set up from `cfg` once it fits them; `what` (evaluate, export) names the
    command in the errors."""
    from pipeline.federation.assembly import setup

    if path is not None:
        source = given(Path(path))
    else:  # the latest intact checkpoint: a damaged one is named and passed over
        source = choose(run_dir, True, f"nothing to {what}")
        if source is None:
            raise UserError(f"{run_dir}: no checkpoint to {what}")
    model, tokenizer, tiers, strategy, data = setup(cfg)
    check_fits(source, cfg, strategy, run_dir / "config.yaml")
    tensors, meta = checkpoint.load_checkpoint(source)
    strategy.load_state_dict({"tensors": tensors, "meta": meta["strategy"]})
    return Restored(source, meta, model, tokenizer, tiers, strategy, data)


def check_fits(path: Path, cfg: Config, strategy, config_file: Path) -> dict[str, Any]:
    """The checkpoint's state.json once its algorithm and its tensors' names, dtypes and shapes
    match what `strategy` (fresh from `cfg`) holds and every value is finite; else UserError."""
    meta = checkpoint.load_meta(path)
    if meta["algorithm"] != cfg.algorithm.name:
        raise UserError(f"{path}: a checkpoint of {meta['algorithm']}, but {config_file} has algorithm.name: "
                        f"{cfg.algorithm.name}; set it back to {meta['algorithm']}")
    restore_config = f"restore {config_file} as the run was started (model.source, model.lora)"
    have = tensor_specs(path)
    want = {k: (checkpoint._SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in strategy.state_dict()["tensors"].items()}
    for key, spec in want.items():
        if key not in have:
            raise UserError(f"{path}: holds no {key}, which {config_file} needs; {restore_config}")
        if have[key] != spec:
            what, fix = _mismatch(key, have[key], spec, cfg.model.lora.rank, config_file)
            raise UserError(f"{path}: {what}; {fix or restore_config}")
    extra = sorted(k for k in have if k.startswith("adapters/") and k not in want)
    if extra:
        raise UserError(f"{path}: holds {extra[0]}, which {config_file} does not make; {restore_config}")
    bad = first_non_finite(path)
    if bad:
        raise UserError(f"{path}: {bad} holds NaN or Inf, so the run cannot continue from it; start the "
                        "run again (e.g. with a lower train.lr)")
    return meta


def _mismatch(key: str, have: tuple, want: tuple, rank: int, config_file: Path) -> tuple[str, str | None]:
    """What differs, and the fix when it is known (an edited LoRA rank)."""
    (have_dtype, have_shape), (want_dtype, want_shape) = have, want
    if have_dtype != want_dtype:
        return f"{key} is {have_dtype}, the config makes it {want_dtype}", None
    dims = [i for i, (a, b) in enumerate(zip(have_shape, want_shape)) if a != b]
    if len(have_shape) == len(want_shape) and len(dims) == 1 and want_shape[dims[0]] == rank:
        return (f"{key} has LoRA rank {have_shape[dims[0]]}, but {config_file} has model.lora.rank: {rank}",
                f"set it back to {have_shape[dims[0]]}")
    return f"{key} has shape {list(have_shape)}, the config makes it {list(want_shape)}", None


def tensor_specs(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's (safetensors dtype, shape) from the file headers, expert shards joined
    along experts; no tensor data is read."""
    files = [Path(path) / checkpoint.TENSORS] + [p for _, _, p in checkpoint.expert_shard_files(path)]
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, file in enumerate(files):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                dtype, shape = piece.get_dtype(), tuple(piece.get_shape())
                if i and key in specs:  # a later shard's rows of an expert tensor
                    shape = (specs[key][1][0] + shape[0], *shape[1:])
                specs[key] = (dtype, shape)
    return specs


def first_non_finite(path: Path) -> str | None:
    """The name of the first tensor holding NaN or Inf, read one tensor at a time."""
    files = [Path(path) / checkpoint.TENSORS] + [p for _, _, p in checkpoint.expert_shard_files(path)]
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                value = fh.get_tensor(key)
                if value.is_floating_point() and not torch.isfinite(value).all():
                    return key
    return None
