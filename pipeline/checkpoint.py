"""Atomic, verifiable round checkpoints: RUN/checkpoints/round-NNNNNN/ and RUN/checkpoints/latest.

A checkpoint is written into a temporary directory, every file fsynced, then `manifest.json`
(each file's size, sha256 and, for safetensors, tensor names) written last and atomically, then
the directory is renamed into place; `latest` is replaced atomically afterwards. `damage` checks
a checkpoint against its manifest, so `resume` and `eval` can pass over a damaged one to the
previous one (`verified_checkpoint`). Checkpoints from before manifests are checked for readable
files and fields only. Loading reads safetensors and JSON only: no pickled code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.errors import RetryableError, UserError

TENSORS = "state.safetensors"
META = "state.json"
MANIFEST = "manifest.json"
# state.json's fields as outputs.save_round writes them; a wrong type is damage, not a crash later
META_FIELDS = {"round": int, "metrics_offset": int, "algorithm": str, "strategy": dict}
_KINDS = {int: "an integer", str: "a string", dict: "a JSON object"}


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
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
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
    try:
        if not staged:
            clear_dir(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        _fsync_path(tmp / TENSORS)
        (tmp / META).write_text(json.dumps({"round": round_, **meta}, indent=1))
        _fsync_path(tmp / META)
        write_manifest(tmp)  # last: a directory holding it is complete
        if final.exists():  # a resumed run re-reaching a round replaces its older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        write_atomic(root / "latest", final.name + "\n")
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own type
        shutil.rmtree(tmp, ignore_errors=True)  # gives back what the failed write took
        raise _write_failed(run_dir, final, exc) from None
    _prune(root, keep)
    return final


_USER_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
               errno.EROFS: "make the file system writable", errno.EACCES: "fix the permissions",
               errno.EPERM: "fix the permissions"}


def _write_failed(run_dir: Path, final: Path, exc: Exception) -> Exception:
    """One line: what failed, that the previous checkpoint is intact, what to do. A full disk
    or a read-only directory needs the user (UserError); other I/O errors may pass on retry."""
    code = exc.errno if isinstance(exc, OSError) else None
    found = re.search(r"os error (\d+)", str(exc))  # SafetensorError carries the errno in its text
    code = code if code is not None else (int(found.group(1)) if found else None)
    what = os.strerror(code) if code else str(exc)
    previous = latest_checkpoint(run_dir)
    kept = (f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists")
    then = "continues from it" if previous else "starts the run over"
    if code in _USER_FIXES:
        return UserError(f"{final}: {what} while writing this checkpoint; {kept}: "
                         f"{_USER_FIXES[code]}, then `fedmoe resume {run_dir}` {then}")
    return RetryableError(f"{final}: {what} while writing this checkpoint; {kept}: "
                          f"resume again with `fedmoe resume {run_dir}`")


def write_manifest(directory: Path) -> None:
    """manifest.json: size, sha256 and (safetensors) tensor names of every file in `directory`."""
    files = {p.name: _describe(p) for p in sorted(Path(directory).iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    write_atomic(Path(directory) / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            entry["tensors"] = sorted(fh.keys())
    return entry


def _complete(path: Path) -> bool:
    """Fully written: a manifest, or (before manifests) state.json beside the tensors."""
    return (path / MANIFEST).is_file() or ((path / META).is_file() and (path / TENSORS).is_file())


def _prune(root: Path, keep: int) -> None:
    rounds = sorted(p for p in root.glob("round-*") if _complete(p))
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-round-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first: the one `latest` names, then by round."""
    root = checkpoint_dir(run_dir)
    rounds = sorted((p for p in root.glob("round-*") if _complete(p)), reverse=True)
    try:
        named = root / (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named in rounds:
        rounds.remove(named)
        rounds.insert(0, named)
    return rounds


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (not verified: see `verified_checkpoint`)."""
    rounds = complete_checkpoints(run_dir)
    return rounds[0] if rounds else None


def verified_checkpoint(run_dir: Path, warn: Callable[[str], None], remedy: str) -> Path | None:
    """The newest checkpoint that `damage` finds intact; `warn` gets one line per damaged one
    passed over. None when the run has no checkpoint; UserError when every one is damaged."""
    damaged = []
    for path in complete_checkpoints(run_dir):
        why = damage(path)
        if why is None:
            for bad, reason in damaged:
                warn(f"{bad} is damaged ({reason}); using {path.name}")
            return path
        damaged.append((path, why))
    if not damaged:
        return None
    listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    raise UserError(f"{checkpoint_dir(run_dir)}: no intact checkpoint ({listing}); {remedy}")


def damage(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be trusted (a missing, truncated or changed file, a
    missing tensor, a wrongly typed state.json field), or None when it is intact."""
    path = Path(path)
    listed = None
    if (path / MANIFEST).exists():
        try:
            listed = json.loads((path / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST}: unreadable"
        if not (isinstance(listed, dict) and all(isinstance(v, dict) and "/" not in k and not k.startswith(".")
                                                 for k, v in listed.items())):
            return f"{MANIFEST}: unreadable"
        unlisted = [p.name for p in path.glob("experts-*.safetensors") if p.name not in listed]
        if unlisted:
            return f"{unlisted[0]}: not in the manifest"
    names = list(listed) if listed is not None else [META, TENSORS]
    for name in names:
        if not (path / name).is_file():
            return f"{name}: missing"
    why = _meta_damage(path)
    if why:
        return why
    for name in [n for n in names if n.endswith(".safetensors")] + (
            [] if listed is not None else [p.name for p in path.glob("experts-*.safetensors")]):
        entry = listed.get(name, {}) if listed is not None else {}
        size = (path / name).stat().st_size
        try:
            with safe_open(str(path / name), framework="pt") as fh:
                keys = set(fh.keys())
        except (OSError, SafetensorError) as exc:
            if size < entry.get("size", 0):
                return f"{name}: truncated ({size} of {entry['size']} bytes)"
            return f"{name}: unreadable ({exc})"
        missing = sorted(set(entry.get("tensors", [])) - keys)
        if missing:
            return f"{name}: tensor {missing[0]!r} missing"
    for name, entry in (listed or {}).items():
        size = (path / name).stat().st_size
        if size != entry.get("size"):
            return f"{name}: {size} bytes, the manifest records {entry.get('size')}"
        if _sha256(path / name) != entry.get("sha256"):
            return f"{name}: checksum differs from the manifest"
    return None


def _meta_damage(path: Path) -> str | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        return f"{META}: unreadable ({exc})"
    if not isinstance(meta, dict):
        return f"{META}: not a JSON object"
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in meta else f"{json.dumps(value)[:20]}"
            return f"{META}: {key!r} is {got}, expected {_KINDS[kind]}"
    named = re.fullmatch(r"round-(\d+)", path.name)
    if (named and int(named.group(1)) != meta["round"]) or meta["metrics_offset"] < 0:
        return f"{META}: round {meta['round']} / metrics_offset {meta['metrics_offset']} do not fit {path.name}"
    return None


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
        tensors.update(read_expert_rows(expert_shard_files(path), expert_range))
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


def expert_shard_files(directory: Path) -> list[tuple[int, int, Path]]:
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


def join_expert_shard_files(out: Path, tensors: dict[str, Tensor], shards: list[tuple[int, int, Path]]) -> None:
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
