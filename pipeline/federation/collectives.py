"""Cross-group sums of Strategy contributions: one buffer per dtype, one MPI Allreduce.

(Under torchrun-style launchers the comms are federation/torchcomm.TorchComm, the same API on gloo.)

Each group sums its own clients' `contribution` tensors into `PackedSums` (rounds.run_round): one
contiguous buffer per wire dtype in sorted-key order. The group leaders then agree on the union
of keys, shapes and dtypes (one small `allgather` of key lists; a key a group lacks is zeros),
sum the buffers with `Allreduce(IN_PLACE)` on numpy views (tensors are never pickled; a plain
dict of sums is packed into such buffers first), and broadcast the result inside their group.
Every rank then holds identical sums, so `strategy.finalize(sums)` makes identical global
state. Expert rows under expert-sharded aggregation go elsewhere (expert_shards.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

# MPI sums these natively. Half types travel as float32 (MPI has no portable half-precision
# sum) and come back in their own dtype.
_WIRE = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float32,
         torch.bfloat16: np.float32, torch.int64: np.int64, torch.int32: np.int32}
_DTYPES = {str(d): d for d in _WIRE}


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "torch.float64"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def wire(self) -> np.dtype:
        return np.dtype(_WIRE[_DTYPES[self.dtype]])


def local_spec(sums: Mapping[str, Tensor]) -> list[Entry]:
    spec = []
    for key in sorted(sums):
        value = sums[key]
        if value.dtype not in _WIRE:
            raise TypeError(f"contribution {key!r}: dtype {value.dtype} cannot be summed across groups")
        spec.append(Entry(key, tuple(value.shape), str(value.dtype)))
    return spec


def union_spec(specs: Sequence[Sequence[Entry]]) -> list[Entry]:
    """All groups' keys, sorted; a key must have one shape and dtype everywhere."""
    seen: dict[str, Entry] = {}
    for spec in specs:
        for entry in spec:
            other = seen.setdefault(entry.key, entry)
            if other != entry:
                raise ValueError(f"contribution {entry.key!r} differs between client groups: "
                                 f"{other.shape} {other.dtype} vs {entry.shape} {entry.dtype}")
    return [seen[k] for k in sorted(seen)]


def buffer_sizes(spec: Sequence[Entry]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for entry in spec:
        sizes[entry.wire.str] = sizes.get(entry.wire.str, 0) + entry.numel
    return sizes


def empty_buffers(spec: Sequence[Entry], fill: bool = True) -> dict[str, np.ndarray]:
    make = np.zeros if fill else np.empty
    return {wire: make(n, dtype=np.dtype(wire)) for wire, n in sorted(buffer_sizes(spec).items())}


def pack(sums: Mapping[str, Tensor], spec: Sequence[Entry]) -> dict[str, np.ndarray]:
    """One flat buffer per wire dtype, entries in spec order; keys absent from `sums` stay 0."""
    unknown = set(sums) - {e.key for e in spec}
    if unknown:
        raise KeyError(f"keys not in the agreed layout: {sorted(unknown)[:3]}")
    buffers = empty_buffers(spec, fill=False)  # every slot is written below: no zero pass
    offsets = dict.fromkeys(buffers, 0)
    for entry in spec:
        wire = entry.wire.str
        start = offsets[wire]
        offsets[wire] = start + entry.numel
        value = sums.get(entry.key)
        if value is None:
            buffers[wire][start:start + entry.numel] = 0
            continue
        if tuple(value.shape) != entry.shape:
            raise ValueError(f"{entry.key}: shape {tuple(value.shape)}, layout says {entry.shape}")
        flat = value.detach().reshape(-1).to(device="cpu", dtype=_torch_dtype(entry.wire))
        torch.from_numpy(buffers[wire][start:start + entry.numel]).copy_(flat)
    return buffers


def unpack(buffers: Mapping[str, np.ndarray], spec: Sequence[Entry]) -> dict[str, Tensor]:
    """The tensors back from the buffers, in their shapes and dtypes: views into the buffers
    (no copy; the buffers belong to the result), except half types, converted back."""
    out: dict[str, Tensor] = {}
    offsets = dict.fromkeys(buffers, 0)
    for entry in spec:
        wire = entry.wire.str
        start = offsets[wire]
        offsets[wire] = start + entry.numel
        view = torch.from_numpy(buffers[wire][start:start + entry.numel]).reshape(entry.shape)
        out[entry.key] = view.to(_DTYPES[entry.dtype])  # a no-op unless the wire type differs
    return out


def _torch_dtype(wire: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=wire)).dtype


class PackedSums:
    """Running sums of client contributions, kept where the cross-group Allreduce reads them:
    views into one flat buffer per wire dtype, in `spec` order. Adding into the buffers as
    clients finish saves the pack copy at the end of the round, which cost about as much as
    the Allreduce itself (bench/aggregate.py). `layout` (last round's agreed spec) lays out the
    keys of a steady run once; a key outside it re-lays the buffers (a copy). Keys that
    `packed` rejects (expert rows, summed elsewhere) are kept as plain tensors.
    """

    def __init__(self, layout: Sequence[Entry] = (), packed=None):
        self.packed = packed or (lambda key: True)
        self.plain: dict[str, Tensor] = {}
        self.used: set[str] = set()  # keys some contribution reached: the ones that are sums
        self.spec: list[Entry] = []
        self.views: dict[str, Tensor] = {}
        self.buffers = empty_buffers(self.spec)
        self.lay_out(layout)

    def lay_out(self, spec: Sequence[Entry]) -> None:
        """Move the sums into buffers laid out as `spec` (a no-op when they already are)."""
        spec = list(spec)
        if spec == self.spec:
            return
        missing = self.used - {e.key for e in spec}
        if missing:
            raise KeyError(f"keys not in the agreed layout: {sorted(missing)[:3]}")
        kept = {k: self.views[k].clone() for k in self.used}
        self.spec, self.buffers = spec, empty_buffers(spec)
        self.views = _views(self.buffers, spec)
        for key, value in kept.items():
            self.views[key].copy_(value)

    def add(self, contribution: Mapping[str, Tensor]) -> None:
        packed = {k: v for k, v in contribution.items() if self.packed(k)}
        new = local_spec({k: v for k, v in packed.items()
                          if k not in self.views or tuple(self.views[k].shape) != tuple(v.shape)})
        if new:  # one re-layout for all new keys
            changed = {e.key for e in new}
            self.lay_out(sorted([e for e in self.spec if e.key not in changed] + new, key=lambda e: e.key))
        for key, value in packed.items():
            self.views[key].add_(value.detach().to(device="cpu", dtype=self.views[key].dtype))
            self.used.add(key)
        for key, value in contribution.items():
            if key not in packed:
                self.plain[key] = self.plain[key] + value if key in self.plain else value.clone()

    def packed_tensors(self) -> dict[str, Tensor]:
        """The packed sums in their own dtypes (views into the buffers unless converted)."""
        return {e.key: self.views[e.key].to(_DTYPES[e.dtype]) for e in self.spec if e.key in self.used}

    def tensors(self) -> dict[str, Tensor]:
        return {**self.packed_tensors(), **self.plain}


def _views(buffers: Mapping[str, np.ndarray], spec: Sequence[Entry]) -> dict[str, Tensor]:
    """Tensors over the buffers' slices, in the wire dtypes."""
    out, offsets = {}, dict.fromkeys(buffers, 0)
    for entry in spec:
        wire = entry.wire.str
        start = offsets[wire]
        offsets[wire] = start + entry.numel
        out[entry.key] = torch.from_numpy(buffers[wire][start:start + entry.numel]).reshape(entry.shape)
    return out


def allreduce_sums(sums, spec: Sequence[Entry], group_comm, leaders) -> dict[str, Tensor]:
    """Sum `sums` (a dict of tensors, or PackedSums) over all groups: Allreduce among leaders
    (`leaders` is None on other ranks), then Bcast from each leader to its group. `spec` must
    be the agreed union on every rank; PackedSums are reduced in their own buffers.
    The comms are mpi4py's or TorchComm (torchrun-style launchers): the same calls either way."""
    from pipeline.federation.torchcomm import api

    MPI = api(leaders if leaders is not None else group_comm)
    if isinstance(sums, PackedSums):  # in place; other ranks of the group receive the Bcast there
        sums.lay_out(spec)
        buffers = sums.buffers
    else:
        buffers = pack(sums, spec) if leaders is not None else empty_buffers(spec)
    for wire in sorted(buffers):  # same order on every rank
        buf = buffers[wire]
        if leaders is not None:
            leaders.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if group_comm is not None and group_comm.Get_size() > 1:
            group_comm.Bcast(buf, root=0)
    if isinstance(sums, PackedSums):  # its own views: no new tensors (unpack costs ~10 us a tensor)
        return {e.key: sums.views[e.key].to(_DTYPES[e.dtype]) for e in spec}
    return unpack(buffers, spec)


def gather_from_leaders(local: Any, group_comm, leaders) -> list[Any]:
    """Every group leader's `local` object (small metadata only), on every rank, in group order."""
    gathered = leaders.allgather(local) if leaders is not None else None
    if group_comm is not None and group_comm.Get_size() > 1:
        gathered = group_comm.bcast(gathered, root=0)
    return gathered
