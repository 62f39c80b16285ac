"""`fedmoe plan`: what a config does on N ranks, computed without running it.

The client groups and the clients each serves (tables.py), each group's predicted busy time and
the GPU utilisation per round under both placements (utilisation.py), each tier's estimated GPU memory
(memory.py; exit 2 when a tier cannot fit) and, with `--sbatch`, the SLURM resources that pack
the groups onto nodes (slurm.py).
"""
from __future__ import annotations

from typing import Sequence

from pipeline.config import Config


def show_plan(cfg: Config, ranks: int, rounds: int, sbatch: bool = False, config_path: str | None = None,
              overrides: Sequence[str] = (), gpus_per_node: int = 8) -> None:
    from rich.console import Console

    from pipeline.federation.topology import plan_layout
    from pipeline.plan.tables import layout_tables, memory_report
    from pipeline.plan.utilisation import planned_schedules, utilisation_report

    console = Console()
    layout = plan_layout(cfg, ranks)
    schedules = planned_schedules(cfg, layout)  # both placements' predicted rounds ({}: no model shape)
    predicted = "balanced" if cfg.federation.placement == "queue" else cfg.federation.placement  # its forecast
    placed = {r.round: r.groups for r in schedules.get(predicted, [])}
    for table in layout_tables(cfg, layout, rounds, placed):
        console.print(table)
    utilisation_report(cfg, layout, schedules, rounds, console)  # predicted busy time and GPU use
    memory_report(cfg, ranks, console)  # per-tier GPU memory; UserError (exit 2) if one cannot fit
    console.print("launch: mpiexec -n %d python -m mpi4py -m pipeline.cli run --config ..." % ranks)
    if sbatch:
        from pipeline.plan.slurm import sbatch_text

        print(sbatch_text(cfg, layout, config_path or "configs/default.yaml",
                          f"runs/{cfg.algorithm.name}-seed{cfg.seed}", overrides, gpus_per_node))
