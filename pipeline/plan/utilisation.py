"""`fedmoe plan`: each group's predicted busy time and the GPU utilisation of every round of the
sampled schedule, under both placements (federation/placement.py), from the planned cost model
(no round measured yet)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config, resolve_tiers
from pipeline.federation.placement import PLACEMENTS, NOMINAL_TFLOPS, Placement, fit_matrix, tier_costs, tier_settings, utilisation
from pipeline.federation.sampling import assign_tiers, sample_clients
from pipeline.federation.topology import Layout


@dataclass(frozen=True)
class PlannedRound:
    round: int
    groups: list[list[int]]
    busy: list[float]  # predicted seconds per group
    utilisation: float | None

    @property
    def wall(self) -> float:
        return max(self.busy, default=0.0)


def planned_placement(cfg: Config, layout: Layout, shape, mode: str) -> Placement:
    tiers = resolve_tiers(cfg, shape.experts, shape.k_max)
    settings = tier_settings(cfg, shape, tiers)
    client_tiers = assign_tiers(cfg.federation.clients, tiers, cfg.seed)
    return Placement(mode, layout, [t.name for t in tiers], [t.index for t in client_tiers],
                     tier_costs(cfg, shape, settings), fit_matrix(cfg, shape, layout, [k for k, _ in settings]))


def schedule(cfg: Config, layout: Layout, shape, mode: str) -> list[PlannedRound]:
    """Every round of the run's sampled schedule, placed by `mode` at planned throughput."""
    placement = planned_placement(cfg, layout, shape, mode)
    fed = cfg.federation
    out = []
    for round_ in range(1, fed.rounds + 1):
        groups = placement.assign(sample_clients(fed.clients, fed.clients_per_round, cfg.seed, round_))
        busy = placement.current.predicted
        out.append(PlannedRound(round_, groups, busy, utilisation(busy, placement.gpus)))
    return out


def mean_utilisation(rounds: list[PlannedRound]) -> float | None:
    """The run's: busy GPU-seconds over GPUs x the summed round walls (None: nothing to do)."""
    values = [(r.utilisation, r.wall) for r in rounds if r.utilisation is not None]
    wall = sum(w for _, w in values)
    return sum(u * w for u, w in values) / wall if wall else None


def planned_schedules(cfg: Config, layout: Layout) -> dict[str, list[PlannedRound]]:
    """Both placements' schedules; {} when the model's shape cannot be read offline
    (memory_report says why)."""
    from pipeline.errors import UserError
    from pipeline.plan.memory import model_shape

    try:
        shape = model_shape(cfg.model.source)
    except UserError:
        return {}
    return {mode: schedule(cfg, layout, shape, mode) for mode in PLACEMENTS}


def utilisation_tables(cfg: Config, layout: Layout, schedules: dict[str, list[PlannedRound]], rounds: int) -> list:
    """One table per placement: its first `rounds` rounds and the run's total and mean."""
    from rich import box
    from rich.table import Table

    tables = []
    for mode, planned in schedules.items():
        chosen = " (federation.placement)" if mode == cfg.federation.placement else ""
        table = Table(title=f"{mode} placement{chosen}: predicted busy seconds per group at "
                            f"{NOMINAL_TFLOPS:g} TFLOP/s per GPU, GPU utilisation",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("round")
        for g in layout.groups:
            table.add_column(f"g{g.index} ({g.tier or 'all'}, {g.size} GPU)", justify="right")
        table.add_column("round wall", justify="right")
        table.add_column("GPU util.", justify="right")
        for r in planned[:rounds]:
            table.add_row(str(r.round), *(_seconds(b) if b else "-" for b in r.busy), _seconds(r.wall),
                          _percent(r.utilisation))
        total = [sum(r.busy[g] for r in planned) for g in range(len(layout.groups))]
        table.add_row(f"all {len(planned)}", *(_seconds(b) for b in total), _seconds(sum(r.wall for r in planned)),
                      _percent(mean_utilisation(planned)), style="bold")
        tables.append(table)
    return tables


def utilisation_report(cfg: Config, layout: Layout, schedules: dict[str, list[PlannedRound]], rounds: int,
                       console) -> None:
    """Print both placements' tables and one line comparing them."""
    if not schedules:
        return
    for table in utilisation_tables(cfg, layout, schedules, rounds):
        console.print(table)
    tier, balanced = (schedules[m] for m in PLACEMENTS)
    walls = [sum(r.wall for r in s) for s in (tier, balanced)]
    if walls[0]:
        console.print(f"mean GPU utilisation over {cfg.federation.rounds} rounds: tier "
                      f"{_percent(mean_utilisation(tier))}, balanced {_percent(mean_utilisation(balanced))}; "
                      f"summed round walls balanced / tier = {walls[1] / walls[0]:.2f}")


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"  # a tiny model's rounds take milliseconds


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"
