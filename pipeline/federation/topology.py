"""MPI world -> client groups: the layout, and each rank's handles.

The layout is pure: from the tiers (`tiers[].ranks`, default 1) and the number of ranks it makes
client groups of contiguous world ranks, tiers taken in config order round-robin while ranks
remain, so 4 ranks and tiers {low: 2, high: 2} give group 0 = ranks 0-1 (low), group 1 = ranks
2-3 (high). A group is one DeepSpeed engine, data-parallel over its ranks; it serves virtual
clients one after another. Each round a tier's sampled clients go round-robin to that tier's
groups; clients of a tier without a group go to the least loaded group.

At run time `MPI.COMM_WORLD.Split` makes the groups, and each group gets its own
torch.distributed world (own rendezvous port), so DeepSpeed's process-global groups stay per
group; cross-group traffic is mpi4py only (federation/collectives.py). Under a torchrun-style
launcher (torchrun, `accelerate launch`: RANK, WORLD_SIZE > 1, MASTER_ADDR, MASTER_PORT set, no
MPI launcher) the world is a `torchcomm.TorchComm` instead, gloo groups with mpi4py's API made
outside the default process group, and everything else is the same. Without a launcher (or
with one rank) there is one group of one rank and mpi4py is never imported: the
single-process path is the embedded default.

Expert parallelism inside a group: a tier's `ep_size` (a divisor of its `ranks` and of the
expert count) splits the group's torch world into DeepSpeed's expert-parallel groups of
`ep_size` consecutive ranks, each rank holding its share of every layer's experts and their
LoRA (pipeline/engine/expert_parallel.py). A group's degrees are its `GroupSpec.dims`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from pipeline.config import Config
from pipeline.engine.parallel_dims import ParallelDims
from pipeline.errors import UserError

# Set by MPI launchers (MPICH/Hydra, Open MPI, PMIx, srun --mpi=pmi2): without one of them we
# never import mpi4py, whose MPI_Init would otherwise run in every single-process run.
_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class GroupSpec:
    index: int
    tier: str | None  # the tier whose clients it serves; None: the single-process group (all)
    ranks: tuple[int, ...]  # world ranks, contiguous; ranks[0] is the group leader
    ep: int = 1  # the tier's expert-parallel degree (tiers[].ep_size)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.size, self.ep)


@dataclass(frozen=True)
class Layout:
    world_size: int
    groups: tuple[GroupSpec, ...]

    def group_of(self, rank: int) -> GroupSpec:
        for group in self.groups:
            if rank in group.ranks:
                return group
        raise ValueError(f"rank {rank} is in no group of a {self.world_size}-rank layout")

    def assign(self, clients: Sequence[int], client_tiers: Sequence[str]) -> list[list[int]]:
        """Per group, the clients it trains this round (each client exactly once).

        `client_tiers[c]` is client c's tier name. Deterministic in the sampled list, so every
        rank computes the same assignment without communicating.
        """
        out: list[list[int]] = [[] for _ in self.groups]
        if len(self.groups) == 1:
            out[0] = list(clients)
            return out
        by_tier: dict[str, list[int]] = {}
        for group in self.groups:
            by_tier.setdefault(group.tier, []).append(group.index)
        homeless = []
        turn: dict[str, int] = {}
        for client in clients:
            tier = client_tiers[client]
            groups = by_tier.get(tier)
            if not groups:
                homeless.append(client)
                continue
            i = turn.get(tier, 0)
            out[groups[i % len(groups)]].append(client)
            turn[tier] = i + 1
        for client in homeless:  # least loaded group, lowest index on ties
            target = min(range(len(out)), key=lambda g: (len(out[g]), g))
            out[target].append(client)
        return [sorted(c) for c in out]


def _fill(tiers: Sequence[tuple[str, int, int]], world_size: int) -> tuple[list[GroupSpec], int]:
    groups: list[GroupSpec] = []
    next_rank = 0
    added = True
    while added:
        added = False
        for name, size, ep in tiers:
            if world_size - next_rank >= size:
                groups.append(GroupSpec(len(groups), name, tuple(range(next_rank, next_rank + size)), ep))
                next_rank += size
                added = True
    return groups, world_size - next_rank


def plan_layout(cfg: Config, world_size: int) -> Layout:
    """Client groups for `world_size` ranks; UserError if the ranks cannot hold them."""
    if world_size < 1:
        raise UserError(f"ranks: must be >= 1, got {world_size}")
    if world_size == 1:  # the embedded default: one process trains every tier's clients
        return Layout(1, (GroupSpec(0, None, (0,)),))
    wanted = [(t.name, t.ranks, t.ep_size) for t in cfg.tiers]
    groups, left = _fill(wanted, world_size)
    sizes = ", ".join(f"{n}: {r}" for n, r, _ in wanted)
    if left:
        fits = [n for n in range(max(2, world_size - 16), world_size + 17) if _fill(wanted, n)[1] == 0]
        below = [n for n in fits if n < world_size]
        above = [n for n in fits if n > world_size]
        hint = " or ".join(str(n) for n in ([below[-1]] if below else []) + ([above[0]] if above else []))
        raise UserError(f"{world_size} ranks cannot be split into client groups of the tiers' ranks "
                        f"(tiers[].ranks: {sizes}): {left} rank(s) left without a group"
                        + (f"; try {hint} ranks" if hint else ""))
    biggest = max(g.size for g in groups)
    if cfg.train.batch_size < biggest:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is smaller than a client group of "
                        f"{biggest} ranks: every rank needs at least one example per step")
    return Layout(world_size, tuple(groups))


# ---------------------------------------------------------------------------------------------
# Run time: this rank's place in the layout, its communicators and its torch.distributed world


def mpi_world():
    """The launcher's world when there is more than one rank, else None: MPI.COMM_WORLD under an
    MPI launcher; a TorchComm under a torchrun-style one (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
    set, none of the MPI launchers' variables). Workers of torch.distributed.run (torchrun,
    accelerate) are never MPI ranks, even when the agent inherited PMI variables from `srun`."""
    if "TORCHELASTIC_RUN_ID" in os.environ or not any(v in os.environ for v in _LAUNCHER_VARS):
        from pipeline.federation import torchcomm

        return torchcomm.TorchComm.world() if torchcomm.launched() else None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def _check_accelerate(cfg: Config) -> None:
    """`accelerate launch` with a DeepSpeed plugin: the run config, not the plugin, configures
    DeepSpeed (we build no Accelerator), so a ZeRO stage that disagrees is refused, not ignored."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true" or stage in (None, ""):
        return
    if int(stage) != cfg.deepspeed.zero_stage:
        raise UserError(f"accelerate config: zero_stage {stage}, run config: deepspeed.zero_stage="
                        f"{cfg.deepspeed.zero_stage}; fedmoe configures DeepSpeed from the run config "
                        f"only, so make them agree (--set deepspeed.zero_stage={stage})")


class Topology:
    """This rank's group, the MPI communicators, and who writes files.

    `group_comm` spans the group's ranks; `leaders` (group leaders only, else None) carries the
    cross-group sums. World rank 0 leads group 0 and is the only rank that writes files.
    """

    def __init__(self, layout: Layout, comm=None):
        self.layout = layout
        self.world = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.group = layout.group_of(self.rank)
        self.group_rank = self.group.ranks.index(self.rank)
        self.group_comm = self.leaders = None
        if comm is not None:
            from pipeline.federation.torchcomm import api

            MPI = api(comm)  # mpi4py.MPI, or TorchComm's equivalents under torchrun
            self.group_comm = comm.Split(color=self.group.index, key=self.rank)
            leaders = comm.Split(color=0 if self.group_rank == 0 else MPI.UNDEFINED, key=self.rank)
            self.leaders = None if leaders == MPI.COMM_NULL else leaders

    @property
    def distributed(self) -> bool:
        return self.world is not None

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0

    def my_clients(self, clients: Sequence[int], client_tiers: Sequence[str]) -> list[int]:
        return self.layout.assign(clients, client_tiers)[self.group.index]

    def barrier(self) -> None:
        if self.world is not None:
            self.world.Barrier()

    def init_torch(self, master_port: int | None = None) -> None:
        """This group's own torch.distributed world (gloo on CPU, nccl on GPU) for DeepSpeed."""
        from pipeline.engine.client import free_port, init_distributed

        # torchrun's workers find its agent's store through this; a client group's world hosts
        # its own store on the leader (the launcher's MASTER_PORT is the world comm's).
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        if self.world is None:
            init_distributed()
            return
        from pipeline.federation.torchcomm import TorchComm, api

        MPI = api(self.world)
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        local_rank = node.Get_rank()  # selects the GPU on a node: distinct per process
        node.Free()
        import torch

        if torch.cuda.is_available():  # more ranks than GPUs on a node share them round-robin
            local_rank %= torch.cuda.device_count()
        hosts = self.group_comm.allgather(MPI.Get_processor_name())
        addr = os.environ.get("FEDMOE_MASTER_ADDR") or (
            "127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
        if master_port is not None:
            port = master_port + self.group.index
            last = master_port + len(self.layout.groups) - 1
            launcher = os.environ.get("MASTER_PORT") if isinstance(self.world, TorchComm) else None
            if launcher is not None and master_port <= int(launcher) <= last:
                raise UserError(f"federation.master_port={master_port}: group ports {master_port}-"
                                f"{last} include the launcher's "
                                f"MASTER_PORT {launcher}; pick another or null (free ports)")
        else:  # the leader hosts the rendezvous store, so it picks a port free on its node
            port = self.group_comm.bcast(free_port() if self.is_leader else None, root=0)
        init_distributed(rank=self.group_rank, world_size=self.group.size, local_rank=local_rank,
                         master_addr=addr, master_port=port)


_CURRENT: Topology | None = None


def current_topology(cfg: Config) -> Topology:
    """The process's topology (built once: the MPI splits and the torch world are per process)."""
    global _CURRENT
    _check_accelerate(cfg)
    comm = mpi_world() if _CURRENT is None else _CURRENT.world
    layout = plan_layout(cfg, comm.Get_size() if comm is not None else 1)
    if _CURRENT is None:
        _CURRENT = Topology(layout, comm)
    elif _CURRENT.layout != layout:  # the torch worlds of the first layout are already up
        raise RuntimeError("a second config with a different MPI layout in one process")
    return _CURRENT
