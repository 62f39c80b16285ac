"""`RUN/report.md` and `RUN/plots/*.png`, rebuilt from `RUN/metrics.jsonl` (+ `RUN/config.yaml`).

The numbers come from summary.py (`load_summary`); `write_report(run_dir)` renders them with
three plots:

    plots/accuracy.png     accuracy per tier vs round (round 0 = base model), dashed chance line
    plots/expert_load.png  per tier, layers x experts: routed tokens relative to a uniform router
    plots/train_loss.png   mean client training loss per tier vs round
    plots/step_loss.png    mean client training loss at every local step across rounds (step_loss.py)
    plots/utilisation.png  GPU utilisation per round, measured and predicted, busy time per group
                           (utilisation.py)

Works on partial runs (only the base eval, a killed run): missing data gives a placeholder plot.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.eval import async_report
from pipeline.eval.balance import LOW_LOAD
from pipeline.eval.metrics import is_number, percent, read_metrics
from pipeline.eval.step_loss import plot_step_loss
from pipeline.eval.summary import RunData, collect, relative_load, summarise
from pipeline.eval.utilisation import mean_utilisation, plot_utilisation

__all__ = ["write_report"]


# ---------------------------------------------------------------------------------------------
# Plots


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no pyplot, no display, safe on headless nodes
    return fig


def _save(fig: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)  # a reader never sees half a PNG


def _placeholder(fig: Figure, message: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_accuracy(data: RunData, path: Path) -> None:
    fig = _new_figure(6.4, 4.0)
    tiers = [t for t in data.tiers if data.evals.get(t)]
    if not tiers:
        _placeholder(fig, "no evaluations yet")
        return _save(fig, path)
    ax = fig.add_subplot()
    for tier in tiers:
        rows = data.evals[tier]
        rounds = [r for r in sorted(rows) if is_number(rows[r].get("accuracy"))]
        top_k = rows[rounds[-1]].get("top_k") if rounds else None
        label = tier if top_k is None else f"{tier} (top_k={top_k})"
        ax.plot(rounds, [rows[r]["accuracy"] for r in rounds], marker="o", label=label)
    if data.chance is not None:
        ax.axhline(data.chance, linestyle="--", color="gray", label="chance")
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_expert_load(data: RunData, summary: dict, path: Path) -> None:
    tiers = [t for t in data.tiers if t in data.load]
    if not tiers:
        fig = _new_figure(6.4, 3.0)
        _placeholder(fig, "no training rounds yet: no expert load")
        return _save(fig, path)
    layers, experts = data.load[tiers[0]].shape
    fig = _new_figure(max(6.0, 2.5 + 0.12 * experts), len(tiers) * max(2.2, 0.9 + 0.2 * layers))
    relative = {t: relative_load(data.load[t]) for t in tiers}
    # One colour scale for all tiers; white = uniform, red = overloaded, blue = starved.
    # Capped at 4x so a single hot expert does not wash out the rest of the map.
    peak = max([0.0] + [float(np.nanmax(r)) for r in relative.values() if np.isfinite(r).any()])
    top = min(max(peak, 2.0), 4.0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    cmap = _colormap()
    axes = fig.subplots(len(tiers), 1, squeeze=False)[:, 0]
    for ax, tier in zip(axes, tiers):
        image = ax.imshow(relative[tier], aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        stats = summary["balance"][tier]
        title = tier
        if stats["cv"] is not None:
            title += (f": CV {stats['cv']:.2f}, {stats['low_load_share'] * 100:.0f}% of experts "
                      f"< {LOW_LOAD:.0%} of uniform")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="load / uniform", extend="max" if peak > top else "neither")
    axes[-1].set_xlabel("expert")
    _save(fig, path)


def _colormap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="lightgray")  # grey: layers that routed no tokens


def plot_train_loss(data: RunData, path: Path) -> None:
    fig = _new_figure(6.4, 4.0)
    tiers = [t for t in data.tiers if data.train_loss.get(t)]
    if not tiers:
        _placeholder(fig, "no client training yet")
        return _save(fig, path)
    ax = fig.add_subplot()
    for tier in tiers:
        rounds = sorted(data.train_loss[tier])
        ax.plot(rounds, [float(np.mean(data.train_loss[tier][r])) for r in rounds], marker="o", label=tier)
    ax.set_xlabel("round")
    ax.set_ylabel("mean client train loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Markdown


def points(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:+.2f} pp"


def duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _accuracy_section(summary: dict) -> list[str]:
    lines = ["## Accuracy per tier", ""]
    if not summary["tiers"]:
        return lines + ["No evaluations recorded yet.", ""]
    rows = []
    for tier, s in summary["tiers"].items():
        best = percent(s["best"]) + (f" (round {s['best_round']})" if s["best_round"] is not None else "")
        rows.append([tier, str(s["top_k"] if s["top_k"] is not None else "—"), percent(s["base"]),
                     percent(s["final"]), best, points(s["change"])])
    lines += _table(["tier", "top_k", "base", "final", "best", "change"], rows)
    final_rounds = sorted({s["final_round"] for s in summary["tiers"].values() if s["final_round"] is not None})
    notes = []
    if final_rounds:
        notes.append("final = round " + ", ".join(map(str, final_rounds)))
    if summary["chance"] is not None:
        notes.append(f"chance = {percent(summary['chance'])}")
    return lines + ["", "Base = round 0 (the model before training); " + "; ".join(notes) + ".", ""]


def _family_section(summary: dict) -> list[str]:
    tiers = [t for t, s in summary["tiers"].items() if s["per_family"]]
    if not tiers:
        return []
    families = sorted({f for t in tiers for f in summary["tiers"][t]["per_family"]})
    rows = [[family] + [percent(summary["tiers"][t]["per_family"].get(family)) for t in tiers]
            for family in families]
    return ["## Final accuracy per task family", ""] + _table(["family"] + tiers, rows) + [""]


def _balance_section(summary: dict) -> list[str]:
    lines = ["## Expert load balance", ""]
    if not summary["balance"]:
        return lines + ["No training rounds recorded yet.", ""]
    rows = []
    for tier, b in summary["balance"].items():
        cv = "—" if b["cv"] is None else f"{b['cv']:.3f}"
        low = "—" if b["low_load_share"] is None else f"{b['low_load_share'] * 100:.1f}%"
        top = "—" if b["max_load"] is None else f"{b['max_load']:.2f}x"
        rows.append([tier, f"{b['routed_per_layer']:.0f}", cv, low, top])
    lines += _table(["tier", "token-expert assignments per layer", "CV across experts",
                     f"experts < {LOW_LOAD:.0%} of uniform", "busiest expert"], rows)
    return lines + ["", "Routed-token counts summed over the run. CV = std / mean of the load across "
                    "experts, averaged over layers (0 = perfectly uniform).", ""]


def _run_section(summary: dict) -> list[str]:
    t = summary["time"]
    lines = ["## Run", "",
             f"- status: {summary['status']}, {summary['rounds']} training rounds",
             f"- training time (sum of round times): {duration(t['train_seconds'])}",
             f"- wall clock (first to last event): {duration(t['wall_seconds'])}"]
    phases = t.get("phases") or {}
    if phases:
        order = ["load", "train", "aggregate", "evaluate", "checkpoint", "export"]
        named = sorted(phases, key=lambda p: order.index(p) if p in order else len(order))
        lines.append("- where the time went (world rank 0): "
                     + ", ".join(f"{p} {duration(phases[p])}" for p in named))
    if t.get("peak_memory_gib"):
        lines.append("- peak memory while training a client: "
                     + ", ".join(f"{tier} {gib:.2f} GiB" for tier, gib in t["peak_memory_gib"].items()))
    if summary.get("utilisation") is not None:
        lines.append(f"- GPU utilisation (busy GPU-seconds / GPUs x round time): {summary['utilisation']:.0%}")
    if t["resumes"]:
        lines.append(f"- resumed {t['resumes']} time(s)")
    jumps = {k: v for k, v in summary.get("loss_jump", {}).items() if v is not None}
    if jumps:
        lines.append("- mean train-loss jump at round starts (first step of round t minus last of t-1): "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in jumps.items()))
    rejected = summary["rejected"]
    if rejected:
        lines.append(f"- rejected client updates: {len(rejected)}")
        lines += [f"  - round {r['round']}, client {r['client']}: {r['reason']}" for r in rejected[:20]]
        if len(rejected) > 20:
            lines.append(f"  - ... and {len(rejected) - 20} more (see metrics.jsonl)")
    return lines + [""]


def render_markdown(summary: dict) -> str:
    lines = [f"# fedmoe report: {summary['algorithm'] or 'unknown algorithm'}", ""]
    lines += summary.get("warnings", [])
    lines += _accuracy_section(summary) + _family_section(summary) + _balance_section(summary)
    lines += _run_section(summary)
    lines += ["## Plots", "",
              "![accuracy per tier](plots/accuracy.png)", "",
              "![expert load per tier](plots/expert_load.png)", "",
              "![train loss per tier](plots/train_loss.png)", "",
              "![train loss at every local step](plots/step_loss.png)", "",
              "![GPU utilisation per round](plots/utilisation.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Rewrite run_dir/report.md and run_dir/plots/*.png from the run's records; returns report.md."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    summary = summarise(data, run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_accuracy(data, plots / "accuracy.png")
    plot_expert_load(data, summary, plots / "expert_load.png")
    plot_train_loss(data, plots / "train_loss.png")
    plot_step_loss(data.clients, data.tiers, _new_figure(8.0, 4.0), plots / "step_loss.png", _save)
    events = read_metrics(run_dir)
    plot_utilisation(events, _new_figure(6.4, 5.0), plots / "utilisation.png", _save)
    summary["utilisation"] = mean_utilisation(events)
    extra = async_report.write_async_plots(run_dir, plots, _new_figure, _save) if async_report.is_async(run_dir) else []
    report = run_dir / "report.md"
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n".join([render_markdown(summary), *extra]))
    os.replace(tmp, report)
    return report
