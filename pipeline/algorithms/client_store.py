"""Per-client state on disk: each virtual client's last upload, for methods that need it
(FedSmoothLoRA's round-matching matrix reads the client's own previous upload).

Memory stays flat in the number of virtual clients: the strategy holds only the index (client ->
round of its last upload); the tensors are files under `RUN/client_state/`, read when the client
is sampled again. A file is written once and never changed: `c<client>-r<round>.safetensors`
(tensors that are not expert rows, and every expert row when the method is not sharded by
expert) plus, under expert-sharded aggregation, `c<client>-r<round>.experts-<a>-<b>.safetensors`
from the ranks owning experts [a, b). Writing by (client, round) keeps resume bitwise: a run
killed between two clients left files of the unfinished round that no index names; the resumed
run rewrites them with the same bytes and reads only what its checkpoint's index names.

Every checkpoint holds the files its index names as hard links under `clients/` (no copy; a
copy where the file system refuses links), so a checkpoint is complete on its own and a file
lives as long as some checkpoint or the live index names it. Resuming links them back.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline import checkpoint
from pipeline.model.adapters import is_expert_adapter

CHECKPOINT_DIR = "clients"  # inside a checkpoint directory
_NAME = re.compile(r"c(\d{6})-r(\d{6})(?:\.experts-(\d{5})-(\d{5}))?\.safetensors")


@dataclass(frozen=True)
class RunStorage:
    """Where a method keeps its own files (shared by every rank) and this rank's part in them."""

    root: Path
    writes_dense: bool = True  # writes the tensors that are not expert rows (one rank per client group)
    writes_experts: bool = True  # writes its expert rows (the ranks whose expert sums count)
    prunes: bool = True  # deletes files no index names any more (world rank 0)
    barrier: Callable[[], None] = lambda: None  # all ranks (after a resume's links)


def _file(client: int, round_: int, experts: tuple[int, int] | None = None) -> str:
    tail = f".experts-{experts[0]:05d}-{experts[1]:05d}" if experts else ""
    return f"c{client:06d}-r{round_:06d}{tail}.safetensors"


def _write(path: Path, tensors: dict[str, Tensor]) -> None:
    """Atomically: readers (other client groups, next round) see the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    checkpoint._fsync_path(tmp)
    os.replace(tmp, path)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: copy
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


class ClientStore:
    def __init__(self, storage: RunStorage):
        self.storage = storage
        self.root = storage.root
        self.index: dict[int, int] = {}  # client -> round of its last upload
        if storage.writes_dense or storage.writes_experts:
            self.root.mkdir(parents=True, exist_ok=True)

    def __contains__(self, client: int) -> bool:
        return client in self.index

    # --- one client ----------------------------------------------------------------------
    def save(self, client: int, round_: int, tensors: dict[str, Tensor],
             expert_range: tuple[int, int] | None) -> None:
        """This rank's part of `tensors` (its expert rows when `expert_range` is set)."""
        dense = {k: v for k, v in tensors.items() if expert_range is None or not is_expert_adapter(k)}
        if self.storage.writes_dense and dense:
            _write(self.root / _file(client, round_), dense)
        experts = {k: v for k, v in tensors.items() if expert_range is not None and is_expert_adapter(k)}
        if self.storage.writes_experts and experts:
            _write(self.root / _file(client, round_, expert_range), experts)

    def load(self, client: int, expert_range: tuple[int, int] | None) -> dict[str, Tensor]:
        """The client's last upload: every tensor, expert tensors as rows `expert_range` (all
        rows when None), whichever expert partition wrote them."""
        round_ = self.index[client]
        main = self.root / _file(client, round_)
        out = load_file(str(main)) if main.exists() else {}
        shards = [(int(m[3]), int(m[4]), p) for p in self.root.glob(f"c{client:06d}-r{round_:06d}.experts-*")
                  if (m := _NAME.fullmatch(p.name))]
        if shards:
            out.update(checkpoint.read_expert_rows(sorted(shards), expert_range))
        elif expert_range is not None:
            out = {k: v[slice(*expert_range)] if is_expert_adapter(k) else v for k, v in out.items()}
        if not out:
            raise FileNotFoundError(f"{self.root}: no state for client {client} of round {round_}")
        return out

    # --- the round -----------------------------------------------------------------------
    def commit(self, round_: int, clients: list[int]) -> None:
        """The round's uploads become the clients' last ones (every rank, after the round)."""
        for client in clients:
            self.index[client] = round_

    def prune(self, round_: int) -> None:
        """Delete files of rounds <= `round_` that the index no longer names (checkpoints keep
        their own links). Later rounds' files may be in the making by another client group."""
        if not self.storage.prunes or not self.root.exists():
            return
        for path in self.root.iterdir():
            m = _NAME.fullmatch(path.name)
            if m and int(m[2]) <= round_ and self.index.get(int(m[1])) != int(m[2]):
                path.unlink(missing_ok=True)

    # --- checkpoints ---------------------------------------------------------------------
    def _indexed(self, directory: Path):
        for path in sorted(directory.iterdir()) if directory.exists() else ():
            m = _NAME.fullmatch(path.name)
            if m and self.index.get(int(m[1])) == int(m[2]):
                yield path

    def stage(self, directory: Path) -> None:
        """Link every indexed file into the checkpoint being written in `directory`."""
        target = Path(directory) / CHECKPOINT_DIR
        target.mkdir(exist_ok=True)
        for path in self._indexed(self.root):
            _link(path, target / path.name)

    def restore(self, directory: Path) -> None:
        """After loading the index of the checkpoint in `directory`: its files back into the store."""
        if self.storage.prunes:
            self.root.mkdir(parents=True, exist_ok=True)
            for path in self._indexed(Path(directory) / CHECKPOINT_DIR):
                _link(path, self.root / path.name)
        self.storage.barrier()

    def state(self) -> dict:
        return {str(c): r for c, r in sorted(self.index.items())}

    def load_state(self, state: dict) -> None:
        self.index = {int(c): int(r) for c, r in state.items()}
