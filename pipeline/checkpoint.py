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

import torch
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


def staging_dir(run_dir: Path, round_: int) -> Path:
    """Where round `round_`'s checkpoint is assembled before it is renamed into place."""
    return checkpoint_dir(run_dir) / f".tmp-round-{round_:06d}"


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def save_checkpoint(run_dir: Path, round_: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = 2, staged: bool = False) -> Path:
    """`staged`: the expert shards are already in `staging_dir` (save_expert_shard, other ranks)."""
    root = checkpoint_dir(run_dir)
    final = root / f"round-{round_:06d}"
    tmp = staging_dir(run_dir, round_)
    if not staged:
        clear_dir(tmp)
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


def load_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({exc})") from None


def load_checkpoint(path: Path, expert_range: tuple[int, int] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state and its metadata; expert shards (if any) joined, or with `expert_range` only
    those experts' rows, read without loading the other rows."""
    try:
        meta = load_meta(path)
        tensors = load_file(str(path / TENSORS))
        tensors.update(read_expert_rows(expert_shards(path), expert_range))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own errors as these
        raise UserError(f"{path}: unreadable checkpoint ({exc})") from None
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# Expert shards: under expert-sharded aggregation each writer rank saves its experts' rows of
# the expert tensors as experts-START-STOP.safetensors (federation/expert_shards.py).

def save_expert_shard(directory: Path, tensors: dict[str, Tensor], start: int, stop: int) -> Path:
    path = Path(directory) / f"experts-{start:05d}-{stop:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_path(path)
    return path


def expert_shards(directory: Path) -> list[tuple[int, int, Path]]:
    """(start, stop, file) of the expert shards in `directory`, by start."""
    out = []
    for path in Path(directory).glob("experts-*-*.safetensors"):
        _, start, stop = path.name[:-len(".safetensors")].split("-")
        out.append((int(start), int(stop), path))
    return sorted(out)


def read_expert_rows(shards: list[tuple[int, int, Path]], rows: tuple[int, int] | None = None
                     ) -> dict[str, Tensor]:
    """Every key of the shards, rows [start, stop) of the whole tensors (None: all rows)."""
    from safetensors import safe_open

    parts: dict[str, list[Tensor]] = {}
    for start, stop, path in shards:
        lo, hi = (start, stop) if rows is None else (max(start, rows[0]), min(stop, rows[1]))
        if lo >= hi:
            continue
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                parts.setdefault(key, []).append(fh.get_slice(key)[lo - start:hi - start])
    return {k: torch.cat(v) for k, v in parts.items()}


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def join_expert_shards(out: Path, tensors: dict[str, Tensor], shards: list[tuple[int, int, Path]]) -> None:
    """One safetensors file of `tensors` plus the shards' tensors joined along experts.

    Written by hand (the format is an 8-byte header length, a JSON header of dtypes, shapes
    and byte offsets, then the bytes) so that one shard's rows are in memory at a time: the
    joining rank never holds every expert's tensors, as `save_file` of a dict would need.
    """
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for _, _, path in shards]
    entries: dict[str, tuple[str, list[int]]] = {k: (_SAFETENSORS_DTYPES[v.dtype], list(v.shape))
                                                 for k, v in tensors.items()}
    for key in (handles[0].keys() if handles else []):
        piece = handles[0].get_slice(key)
        rows = sum(h.get_slice(key).get_shape()[0] for h in handles)
        entries[key] = (piece.get_dtype(), [rows] + list(piece.get_shape()[1:]))
    header, offset = {}, 0
    for key in sorted(entries):
        dtype, shape = entries[key]
        size = _nbytes(dtype, shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    with open(out, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for key in sorted(entries):
            pieces = [tensors[key]] if key in tensors else (h.get_tensor(key) for h in handles)
            for piece in pieces:
                fh.write(piece.contiguous().view(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())


def _nbytes(dtype: str, shape: list[int]) -> int:
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}[dtype]
    n = itemsize
    for d in shape:
        n *= d
    return n
