"""Every parallel degree of one client group, in one object.

A client group of `ranks` ranks is one DeepSpeed engine. Every rank takes its share of each
batch (data parallelism over all of the group's ranks). With `ep` > 1 the ranks also split the
experts: expert-parallel groups of `ep` consecutive ranks each hold 1/ep of every MoE layer's
experts (the routed tokens travel to them, expert_parallel.py), and the `ranks // ep` ranks
holding the same experts (expert-data-parallel replicas) reduce those experts' gradients.

The config names the degrees (`tiers[].ranks`, `tiers[].ep_size`); the layout gives each group
its `ParallelDims` (federation/topology.py), and the engine, the expert-sharded aggregation and
the memory model read them from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class ParallelDims:
    ranks: int = 1  # the client group's ranks, all data-parallel
    ep: int = 1  # expert-parallel degree: ranks that split the experts between them

    def __post_init__(self):
        if self.ranks < 1 or self.ep < 1 or self.ranks % self.ep:
            raise ValueError(f"expert-parallel degree {self.ep} does not divide the group's {self.ranks} ranks")

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def expert_replicas(self) -> int:
        """Ranks holding the same experts (the expert-data-parallel degree)."""
        return self.ranks // self.ep

    def ep_rank(self, group_rank: int) -> int:
        """A group rank's place in its expert-parallel group (consecutive ranks, as DeepSpeed's)."""
        return group_rank % self.ep

    def expert_range(self, num_experts: int, group_rank: int) -> tuple[int, int]:
        """The experts [start, stop) that `group_rank` holds."""
        if num_experts % self.ep:
            raise ValueError(f"expert-parallel degree {self.ep} does not divide the {num_experts} experts")
        local = num_experts // self.ep
        start = self.ep_rank(group_rank) * local
        return start, start + local


@dataclass(frozen=True)
class GroupSums:
    """Sums of a tensor over the ranks that train one client together, for gradient hooks that
    must see the whole batch (UB-SMoE's pseudo-gradients). The engine makes them
    (`ClientEngine.group_sums`) and the run hands them to the strategy; None: nothing to sum
    (one rank; no expert parallelism). Plain functions, so that a deep copy of a model whose
    hooks close over them shares them instead of copying a process group."""

    over_group: Callable[[Tensor], Tensor] | None = None  # over the client group's ranks
    over_experts: Callable[[Tensor], Tensor] | None = None  # over the expert-parallel group
