"""`fedmoe plan --sbatch`: SLURM resources for an MPI layout (docs/slurm.md).

Each rank drives one GPU. `srun`'s default block distribution gives a node contiguous ranks,
and a layout's client groups are contiguous ranks, so packing groups onto nodes is packing
contiguous runs of ranks, in rank order:

- a group of at most `gpus_per_node` ranks never straddles two nodes: it goes on the current
  node if that node has GPUs left for all of it, else it starts the next node;
- a bigger group starts on a fresh node and fills whole nodes; its remainder shares the last
  node with the groups after it.

When every node then gets the same number of ranks, `--ntasks-per-node` places them exactly.
When the counts differ (a group did not fit the room left on a node), the job asks for the
largest count per node and the list of per-node counts goes to `slurm/fedmoe.sbatch` as
FEDMOE_TASKS_PER_NODE, which starts the step with `srun --distribution=arbitrary` on a host
list built from it. A group's torch world then stays inside one node wherever it can.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Sequence

from pipeline.config import Config
from pipeline.errors import UserError

SBATCH_SCRIPT = "slurm/fedmoe.sbatch"
HETJOB_SCRIPT = "slurm/fedmoe-hetjob.sbatch"


@dataclass(frozen=True)
class NodePlan:
    """One node: the (group index, ranks of that group here) pieces, in rank order."""

    pieces: tuple[tuple[int, int], ...]

    @property
    def tasks(self) -> int:
        return sum(n for _, n in self.pieces)


def pack_groups(sizes: Sequence[int], gpus_per_node: int) -> list[NodePlan]:
    """Nodes for groups of `sizes` ranks (in rank order), one GPU per rank (module docstring)."""
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node: must be >= 1, got {gpus_per_node}")
    nodes: list[list[tuple[int, int]]] = []
    free = 0  # GPUs left on the last node
    for index, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"group {index}: size {size}")
        if size <= gpus_per_node:
            if size > free:
                nodes.append([])
                free = gpus_per_node
            nodes[-1].append((index, size))
            free -= size
            continue
        if not nodes or free < gpus_per_node:  # a big group starts on a fresh node
            nodes.append([])
            free = gpus_per_node
        left = size
        while left:
            take = min(left, free)
            nodes[-1].append((index, take))
            free -= take
            left -= take
            if left:
                nodes.append([])
                free = gpus_per_node
    return [NodePlan(tuple(p)) for p in nodes]


@dataclass(frozen=True)
class SbatchPlan:
    nodes: list[NodePlan]
    gpus_per_node: int

    @property
    def ntasks(self) -> int:
        return sum(n.tasks for n in self.nodes)

    @property
    def tasks_per_node(self) -> list[int]:
        return [n.tasks for n in self.nodes]

    @property
    def uniform(self) -> bool:
        return len(set(self.tasks_per_node)) == 1

    @property
    def split_groups(self) -> list[int]:
        """Groups whose ranks span more than one node."""
        seen: dict[int, int] = {}
        for node in self.nodes:
            for group, _ in node.pieces:
                seen[group] = seen.get(group, 0) + 1
        return sorted(g for g, n in seen.items() if n > 1)

    def options(self) -> list[str]:
        """`sbatch` resource options (without the leading `#SBATCH `)."""
        most = max(self.tasks_per_node)
        return [f"--nodes={len(self.nodes)}", f"--ntasks={self.ntasks}", f"--ntasks-per-node={most}",
                f"--gpus-per-node={most}"]

    def env(self) -> dict[str, str]:
        """Variables the batch script needs besides the options (FEDMOE_TASKS_PER_NODE when the
        nodes hold different numbers of ranks)."""
        if self.uniform:
            return {}
        return {"FEDMOE_TASKS_PER_NODE": ",".join(map(str, self.tasks_per_node))}


def sbatch_plan(group_sizes: Sequence[int], gpus_per_node: int = 8) -> SbatchPlan:
    return SbatchPlan(pack_groups(group_sizes, gpus_per_node), gpus_per_node)


def submit_command(plan: SbatchPlan, config: str, run_dir: str, overrides: Sequence[str],
                   script: str = SBATCH_SCRIPT) -> str:
    # The variables go in sbatch's environment, which it passes on (--export=ALL, the default):
    # `--export=ALL,FEDMOE_TASKS_PER_NODE=2,2,3,1` splits at the commas and the job gets "2".
    words = [f"{k}={v}" for k, v in plan.env().items()]
    words += ["sbatch", *plan.options(), script, config, run_dir]
    for override in overrides:
        words += ["--set", override]
    return " ".join(shlex.quote(w) for w in words)


def hetjob_components(layout) -> list[tuple[str, int]] | None:
    """(tier, ranks) per het-job component when each tier has at most one group, in rank order:
    `srun --het-group=0,...` numbers the components' tasks in component order, which then is the
    layout's rank order. None when a tier has several groups (the ranks of one tier are not
    contiguous, so one component per tier would reorder them)."""
    if layout.world_size == 1:
        return None
    tiers = [g.tier for g in layout.groups]
    if len(set(tiers)) != len(tiers):
        return None
    return [(g.tier, g.size) for g in layout.groups]


def sbatch_text(cfg: Config, layout, config: str, run_dir: str, overrides: Sequence[str],
                gpus_per_node: int) -> str:
    """What `fedmoe plan --sbatch` prints after the layout and memory tables."""
    plan = sbatch_plan([g.size for g in layout.groups], gpus_per_node)
    lines = [f"# SLURM: {plan.ntasks} rank(s) on {len(plan.nodes)} node(s) of {gpus_per_node} GPU(s), "
             "one GPU per rank"]
    for i, node in enumerate(plan.nodes):
        pieces = ", ".join(f"group {g} ({layout.groups[g].tier or 'all'}, {n} rank{'s' if n > 1 else ''})"
                           for g, n in node.pieces)
        lines.append(f"#   node {i}: {pieces}")
    if plan.split_groups:
        lines.append("#   groups wider than a node span nodes: " + ", ".join(map(str, plan.split_groups)))
    if not plan.uniform:
        lines.append("#   the nodes hold different numbers of ranks: FEDMOE_TASKS_PER_NODE (below) makes "
                     "slurm/fedmoe.sbatch place them with srun --distribution=arbitrary")
    memories = sorted({t.gpu_memory_gb for t in cfg.tiers})
    components = hetjob_components(layout)
    if len(memories) > 1:
        lines.append(f"#   tiers ask for GPUs of {', '.join(f'{m:g}' for m in memories)} GiB: one job gets one "
                     f"kind of node, so its GPUs must hold {memories[-1]:g} GiB"
                     + (" (or use the het job below)" if components is not None else ""))
    lines += [f"#SBATCH {o}" for o in plan.options()]
    for key, value in plan.env().items():
        lines.append(f"#   export {key}={value}")
    lines.append("submit: " + submit_command(plan, config, run_dir, overrides))
    if components is not None:
        lines.append(f"# het job ({HETJOB_SCRIPT}, sites with heterogeneous jobs): one component per tier,")
        lines.append("#   in rank order; set each component's GPU type (--constraint/--gres) to its tier")
        for i, (tier, ranks) in enumerate(components):
            if i:
                lines.append("#SBATCH hetjob")
            nodes = -(-ranks // gpus_per_node)
            per_node = -(-ranks // nodes)
            lines.append(f"#   component {i}: tier {tier}")
            lines.append(f"#SBATCH --nodes={nodes} --ntasks={ranks} --ntasks-per-node={per_node} "
                         f"--gpus-per-node={per_node}")
    return "\n".join(lines)
