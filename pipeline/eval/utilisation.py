"""GPU utilisation per round of a run (`plots/utilisation.png` of its report).

Each `round` event of metrics.jsonl carries `placement` (federation/placement.py): the clients
per group, the groups' GPUs, their measured busy seconds and the cost model's predicted ones,
the measured utilisation (busy GPU-seconds over GPUs x the round's wall time) and the predicted
one (over its busiest group's predicted time). Events written before placement was logged have
none and are left out.
"""
from __future__ import annotations

from pathlib import Path


def placement_rounds(events: list[dict]) -> dict[int, dict]:
    """Round -> its `placement` record (the last one logged for the round)."""
    out = {}
    for e in events:
        placed, round_ = e.get("placement"), e.get("round")
        if e.get("event") == "round" and isinstance(round_, int) and isinstance(placed, dict):
            out[round_] = placed
    return dict(sorted(out.items()))


def mean_utilisation(events: list[dict]) -> float | None:
    """The run's measured utilisation: busy GPU-seconds over GPUs x the summed round walls."""
    busy = wall = 0.0
    for e in events:
        placed = e.get("placement")
        if e.get("event") != "round" or not isinstance(placed, dict) or placed.get("utilisation") is None:
            continue
        busy += placed["utilisation"] * e["seconds"]
        wall += e["seconds"]
    return busy / wall if wall else None


def plot_utilisation(events: list[dict], fig, path: Path, save) -> None:
    """Measured and predicted utilisation per round; each group's measured busy seconds."""
    rounds = placement_rounds(events)
    if not rounds:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no placement recorded", ha="center", va="center", transform=ax.transAxes,
                color="gray")
        return save(fig, path)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(rounds)
    for key, label, style in (("utilisation", "measured", "-o"), ("predicted_utilisation", "predicted", "--x")):
        ys = [rounds[r].get(key) for r in xs]
        top.plot([x for x, y in zip(xs, ys) if y is not None], [100 * y for y in ys if y is not None],
                 style, label=label)
    mode = next(iter(rounds.values())).get("mode", "?")
    top.set_ylabel("GPU utilisation (%)")
    top.set_ylim(0, 105)
    top.set_title(f"{mode} placement", fontsize=10)
    top.grid(alpha=0.3)
    top.legend()
    groups = max(len(p.get("busy_seconds", [])) for p in rounds.values())
    width = 0.8 / max(groups, 1)
    for g in range(groups):
        gpus = next((p["gpus"][g] for p in rounds.values() if len(p.get("gpus", [])) > g), "?")
        # A run resumed under another layout (e.g. MPI, then one process) has fewer groups in
        # some rounds: those rounds show no bar for the missing groups.
        busy = [rounds[r].get("busy_seconds") or [] for r in xs]
        bottom.bar([x - 0.4 + (g + 0.5) * width for x in xs], [b[g] if g < len(b) else 0 for b in busy],
                   width, label=f"group {g} ({gpus} GPU)")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("round")
    bottom.set_ylabel("busy seconds")
    bottom.grid(alpha=0.3, axis="y")
    bottom.legend(fontsize=8)
    save(fig, path)
