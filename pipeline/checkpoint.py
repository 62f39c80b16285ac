"""Atomic round checkpoints: RUN/checkpoints/round-NNNNNN/ and RUN/checkpoints/latest.

A checkpoint is written into a temporary directory, every file fsynced, then renamed into
place; `latest` is replaced atomically afterwards. A reader trusts only directories holding
`state.json` (written last), so a checkpoint torn by SIGKILL is never picked. Loading reads
safetensors and JSON only: no pickled code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.errors import UserError

TENSORS = "state.safetensors"
META = "state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_checkpoint(run_dir: Path, round_: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_:06d}"
    tmp = root / f".tmp-round-{round_:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    _fsync_path(tmp / TENSORS)
    (tmp / META).write_text(json.dumps({"round": round_, **meta}, indent=1))
    _fsync_path(tmp / META)
    _fsync_path(tmp)
    if final.exists():  # a resumed run re-reaching a round replaces its older copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(root)
    write_atomic(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _complete(path: Path) -> bool:
    return (path / META).is_file() and (path / TENSORS).is_file()


def _prune(root: Path, keep: int) -> None:
    rounds = sorted(p for p in root.glob("round-*") if _complete(p))
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-round-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete round."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            return named
    rounds = sorted(p for p in root.glob("round-*") if _complete(p))
    return rounds[-1] if rounds else None


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({exc})") from None
    return tensors, meta
