"""Expert-sharded aggregation: under expert parallelism expert e's adapters live only on the
ranks that own e, and are summed only among them.

A group of expert-parallel degree P gives group rank g the experts `[(g % P) E/P, (g % P + 1) E/P)`
(ParallelDims.expert_range; DeepSpeed's expert-parallel groups are consecutive ranks). Groups differ in P, so the world
is cut into the finest common partition: L = lcm of the groups' P (it divides E, as every P
does) "fine shards" of E/L experts. Fine shard s has one communicator: every rank owning it.
Within a group only the first expert-parallel group (g < P) puts its sums in; the other ranks
of the group hold the same experts (expert-data-parallel replicas) and add zeros, so every
owner ends with the world's sum without a second broadcast.

Checkpoints are written the same way: the first expert-parallel group of the group with the
largest P writes its ranges (they partition [0, E)); world rank 0 writes the rest.
Strategies that must see whole tensors (`Strategy.expert_sharded` False) do not use this:
their adapters are gathered at the engine boundary instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import lcm
from typing import Mapping, Sequence

import torch
from torch import Tensor

from pipeline.engine.parallel_dims import ParallelDims
from pipeline.federation.collectives import Entry, pack, unpack
from pipeline.model.adapters import is_expert_adapter


def is_expert_key(key: str) -> bool:
    """A contribution or state key whose tensor is indexed by expert in its first dimension:
    the last `/`-part names an expert-LoRA tensor (`sum/...lora_gate_up_A`, `ew/...`) or an
    expert LoRA pair (`delta/...mlp.lora_gate_up`: a merged base delta, [E, out, in])."""
    leaf = key.rsplit("/", 1)[-1]
    return is_expert_adapter(leaf) or is_expert_adapter(leaf + "_A")


@dataclass(frozen=True)
class RankShard:
    """One rank's place in the expert partition."""

    start: int  # first expert this rank owns
    stop: int  # one past the last
    contributes: bool  # its group's sums go into the world's (first expert-parallel group)
    writes: bool  # writes its range of checkpoint and final expert tensors


def plan_shards(groups: Sequence[ParallelDims], num_experts: int) -> tuple[int, list[RankShard]]:
    """(L, per world rank its RankShard) for the groups' degrees, in rank order."""
    fine = lcm(*(d.ep for d in groups))
    if num_experts % fine:
        raise ValueError(f"the groups' expert-parallel degrees (lcm {fine}) do not divide the {num_experts} experts")
    writer = max(range(len(groups)), key=lambda i: (groups[i].ep, -i))  # finest, lowest index
    out = []
    for index, dims in enumerate(groups):
        for g in range(dims.ranks):
            start, stop = dims.expert_range(num_experts, g)
            first = g < dims.ep  # in the group's first expert-parallel group
            out.append(RankShard(start, stop, contributes=first, writes=index == writer and first))
    return fine, out


class ExpertShards:
    """This rank's expert range and its communicators (one per fine shard it owns)."""

    def __init__(self, world, rank: int, groups: Sequence[ParallelDims], num_experts: int):
        from pipeline.federation.torchcomm import api

        self.num_experts = num_experts
        self.fine, shards = plan_shards(groups, num_experts)
        me = shards[rank]
        self.start, self.stop, self.contributes, self.writes = me.start, me.stop, me.contributes, me.writes
        self.width = num_experts // self.fine  # experts per fine shard
        self._mpi = api(world)  # mpi4py.MPI, or TorchComm's equivalents under torchrun
        self.comms: dict[int, object] = {}
        for s in range(self.fine):  # every rank takes part in every Split, in the same order
            owns = self.start <= s * self.width < self.stop
            comm = world.Split(color=0 if owns else self._mpi.UNDEFINED, key=rank)
            if owns:
                self.comms[s] = comm

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.stop

    def allreduce(self, sums: Mapping[str, Tensor], spec: Sequence[Entry]) -> dict[str, Tensor]:
        """The world's sums of this rank's rows of the expert tensors in `spec` (whose shapes
        are the whole `[E, ...]`); `sums` holds this group's `[stop - start, ...]` rows."""
        shard_spec = [Entry(e.key, (self.width,) + e.shape[1:], e.dtype) for e in spec]
        parts: dict[str, list[Tensor]] = {e.key: [] for e in spec}
        for s, comm in self.comms.items():  # ascending s: the same order on every owner
            lo = s * self.width - self.start
            mine = {k: v[lo:lo + self.width] for k, v in sums.items()} if self.contributes else {}
            buffers = pack(mine, shard_spec)
            for wire in sorted(buffers):
                comm.Allreduce(self._mpi.IN_PLACE, buffers[wire], op=self._mpi.SUM)
            for key, value in unpack(buffers, shard_spec).items():
                parts[key].append(value)
        return {k: torch.cat(v) for k, v in parts.items()}


def whole_spec(spec: Sequence[Entry], num_experts: int) -> list[Entry]:
    """A group's expert entries with every expert's rows: the layout all groups agree on."""
    return [Entry(e.key, (num_experts,) + e.shape[1:], e.dtype) for e in spec]
