"""`RUN/report.md` and `RUN/plots/*.png`, rebuilt from `RUN/metrics.jsonl` (+ `RUN/config.yaml`).

`load_summary(run_dir)` holds the numbers (plain JSON-able dict) so that a compare command can
put several runs side by side; `write_report(run_dir)` renders them with three plots:

    plots/accuracy.png     accuracy per tier vs round (round 0 = base model), dashed chance line
    plots/expert_load.png  per tier, layers x experts: routed tokens relative to a uniform router
    plots/train_loss.png   mean client training loss per tier vs round
    plots/step_loss.png    mean client training loss at every local step across rounds (step_loss.py)

Works on partial runs (only the base eval, a killed run): missing data gives a placeholder plot.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.eval.balance import LOW_LOAD, balance_stats
from pipeline.eval.divergence import report_lines
from pipeline.eval.metrics import read_metrics
from pipeline.eval.step_loss import jump_summary, plot_step_loss

__all__ = ["write_report", "load_summary"]


@dataclass
class RunData:
    """What the report needs from a run directory, gathered in one pass over the events."""

    config: dict
    tiers: list[str]  # display order: config order, then order of appearance
    evals: dict[str, dict[int, dict]]  # tier -> round -> eval event (last one wins)
    train_loss: dict[str, dict[int, list[float]]]  # tier -> round -> client losses
    load: dict[str, np.ndarray]  # tier -> [layers, experts] routed tokens summed over rounds
    round_seconds: dict[int, float] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # `run` events: started / resumed / finished
    warnings: list[dict] = field(default_factory=list)  # `divergence` and `data` events
    times: list[float] = field(default_factory=list)
    chance: float | None = None
    clients: list[dict] = field(default_factory=list)  # `client` events (per-step losses)


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # a report should still come out of a run with a broken config
        warnings.warn(f"{path}: not readable YAML ({exc}); reporting without it")
        return {}
    return config if isinstance(config, dict) else {}


def collect(run_dir: Path) -> RunData:
    config = read_config(run_dir)
    data = RunData(config=config, tiers=_config_tiers(config), evals=defaultdict(dict),
                   train_loss=defaultdict(lambda: defaultdict(list)), load={},
                   chance=_config_chance(config))
    for event in read_metrics(run_dir):
        kind, round_ = event.get("event"), event.get("round")
        if isinstance(event.get("time"), (int, float)):
            data.times.append(float(event["time"]))
        if kind == "eval" and _is_int(round_) and round_ >= 0 and "tier" in event:
            _add_tier(data, event["tier"])
            data.evals[str(event["tier"])][round_] = event
            if _is_num(event.get("chance")):
                data.chance = float(event["chance"])
        elif kind == "client" and _is_int(round_) and _is_num(event.get("train_loss")):
            tier = str(event.get("tier", "?"))
            _add_tier(data, tier)
            data.train_loss[tier][round_].append(float(event["train_loss"]))
            data.clients.append(event)
        elif kind == "round" and _is_int(round_):
            if _is_num(event.get("seconds")):
                data.round_seconds[round_] = float(event["seconds"])
            _add_load(data, event.get("expert_load") or {}, round_)
        elif kind == "reject":
            data.rejects.append(event)
        elif kind == "run":
            data.runs.append(event)
        elif kind in ("divergence", "data"):
            data.warnings.append(event)
    return data


def _add_load(data: RunData, expert_load: dict, round_: int) -> None:
    for tier, counts in expert_load.items():
        counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
        tier = str(tier)
        _add_tier(data, tier)
        total = data.load.get(tier)
        if total is None:
            data.load[tier] = counts
        elif total.shape == counts.shape:
            data.load[tier] = total + counts
        else:
            warnings.warn(f"round {round_}: expert load of tier {tier!r} has shape {counts.shape}, "
                          f"earlier rounds {total.shape}; skipped")


def _add_tier(data: RunData, tier: str) -> None:
    if str(tier) not in data.tiers:
        data.tiers.append(str(tier))


def _config_tiers(config: dict) -> list[str]:
    tiers = config.get("tiers") or []
    return [str(t["name"]) for t in tiers if isinstance(t, dict) and "name" in t]


def _config_chance(config: dict) -> float | None:
    for section in (config, config.get("eval"), config.get("data")):
        if isinstance(section, dict) and _is_num(section.get("chance")):
            return float(section["chance"])
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Numbers


def relative_load(load: np.ndarray) -> np.ndarray:
    """Each cell's share of its layer's tokens times the number of experts (1 = uniform)."""
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    totals = load.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, load / totals * load.shape[1], np.nan)


def _tier_summary(rows: dict[int, dict]) -> dict:
    rounds = sorted(rows)
    scored = [r for r in rounds if _is_num(rows[r].get("accuracy"))]
    base = rows[0].get("accuracy") if 0 in scored else None
    final_round = scored[-1] if scored else None
    final = rows[final_round]["accuracy"] if scored else None
    best_round = max(scored, key=lambda r: rows[r]["accuracy"]) if scored else None
    last = rows[rounds[-1]]
    return {"top_k": last.get("top_k"), "lora_rank": last.get("lora_rank"),
            "base": base, "final": final, "final_round": final_round,
            "best": rows[best_round]["accuracy"] if scored else None, "best_round": best_round,
            "change": final - base if final is not None and base is not None else None,
            "final_loss": rows[final_round].get("loss") if scored else None,
            "per_family": dict(rows[final_round].get("per_family") or {}) if scored else {},
            "base_per_family": dict(rows[0].get("per_family") or {}) if 0 in rows else {}}


def _summarise(data: RunData, run_dir: Path) -> dict:
    tiers = {t: _tier_summary(data.evals[t]) for t in data.tiers if data.evals.get(t)}
    statuses = [e.get("status") for e in data.runs]
    algorithm = data.config.get("algorithm")
    return {
        "run_dir": str(run_dir),
        "algorithm": algorithm.get("name") if isinstance(algorithm, dict) else None,
        "status": "finished" if statuses and statuses[-1] == "finished" else "incomplete",
        "rounds": max(data.round_seconds, default=0),
        "chance": data.chance,
        "tiers": tiers,
        "base": {t: s["base"] for t, s in tiers.items()},
        "final": {t: s["final"] for t, s in tiers.items()},
        "balance": {t: balance_stats(data.load[t]) for t in data.tiers if t in data.load},
        "time": {"train_seconds": sum(data.round_seconds.values()),
                 "wall_seconds": max(data.times) - min(data.times) if data.times else 0.0,
                 "resumes": statuses.count("resumed")},
        "rejected": [{k: e.get(k) for k in ("round", "client", "reason")} for e in data.rejects],
        "warnings": report_lines(data.warnings),
        "loss_jump": jump_summary(data.clients),
    }


def load_summary(run_dir: Path) -> dict:
    """Per-tier base/final/best accuracy, expert-load balance, run time; plain JSON-able values.

    Keys: algorithm, status, rounds, chance, tiers {tier: {top_k, lora_rank, base, final,
    final_round, best, best_round, change, final_loss, per_family, base_per_family}},
    base {tier: acc}, final {tier: acc}, balance {tier: balance_stats}, time, rejected,
    loss_jump {tier or "all clients": mean train-loss jump at round starts, or None}.
    """
    run_dir = Path(run_dir)
    return _summarise(collect(run_dir), run_dir)


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
        rounds = [r for r in sorted(rows) if _is_num(rows[r].get("accuracy"))]
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


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


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
              "![train loss at every local step](plots/step_loss.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Rewrite run_dir/report.md and run_dir/plots/*.png from the run's records; returns report.md."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    summary = _summarise(data, run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_accuracy(data, plots / "accuracy.png")
    plot_expert_load(data, summary, plots / "expert_load.png")
    plot_train_loss(data, plots / "train_loss.png")
    plot_step_loss(data.clients, data.tiers, _new_figure(8.0, 4.0), plots / "step_loss.png", _save)
    report = run_dir / "report.md"
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text(render_markdown(summary))
    os.replace(tmp, report)
    return report
