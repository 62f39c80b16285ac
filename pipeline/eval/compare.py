"""`fedmoe compare`: methods x seeds as parallel runs, then a paper-style table and plots.

A spec file (configs/compare/*.yaml) names a base config, seeds, shared overrides and, per
method, its overrides. Every run is an ordinary `fedmoe run` in OUT/<method>-seed<S>/; runs that
finished with the same resolved config are reused and unfinished ones resumed, so an interrupted
comparison continues (compare_runs.py: reuse, --force, signals).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.eval.compare_runs import launch, plan_jobs
from pipeline.eval.metrics import read_metrics
from pipeline.eval.summary import load_summary, relative_load
from pipeline.eval.stats import mean_interval, paired_interval

console = Console()


@dataclass
class Spec:
    base: Path
    seeds: list[int]
    overrides: list[str]
    methods: dict[str, list[str]]
    reference: str | None  # every method's per-seed paired difference to this one is tabulated
    contrasts: list[tuple[str, str]] = ()  # (a, b): a's per-seed paired difference to b, tabulated too
    path: Path | None = None  # the spec file, named in compare.md's title
    convergence_reference: tuple[str, ...] = ()  # whose final training loss the convergence table counts rounds to


def read_spec(path: Path) -> Spec:
    if not path.is_file():
        raise UserError(f"compare spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path}: malformed YAML") from None
    allowed = {"base", "seeds", "overrides", "methods", "reference", "contrasts", "convergence_reference"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    methods = raw.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise UserError(f"{path}: methods: a mapping of method name -> list of overrides is required")
    for name, overrides in methods.items():
        _check_name(path, str(name))
        _check_strings(path, f"methods.{name}", overrides or [])
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) != len(seeds)
            or not all(type(s) is int and s >= 0 for s in seeds)):  # type: bool is an int too
        raise UserError(f"{path}: seeds: a list of distinct integers >= 0 is required, got {seeds!r}")
    _check_strings(path, "overrides", raw.get("overrides", []))
    reference = raw.get("reference")
    if reference is not None and str(reference) not in map(str, methods):
        raise UserError(f"{path}: reference: {reference!r} is not one of the methods ({', '.join(map(str, methods))})")
    contrasts = _read_contrasts(path, raw.get("contrasts", []), list(map(str, methods)))
    loss_references = raw.get("convergence_reference", [])  # one name or a list of names
    loss_references = loss_references if isinstance(loss_references, list) else [loss_references]
    for loss_reference in loss_references:
        if str(loss_reference) not in map(str, methods):
            raise UserError(f"{path}: convergence_reference: {loss_reference!r} is not one of the methods "
                            f"({', '.join(map(str, methods))})")
    base = Path(raw.get("base", "configs/default.yaml"))
    if not base.is_absolute() and not base.exists():
        base = path.parent / base
    spec = Spec(base, seeds, list(raw.get("overrides", [])),
                {str(k): list(v or []) for k, v in methods.items()}, reference, contrasts, path,
                tuple(map(str, loss_references)))
    for name, overrides in spec.methods.items():  # fail now, not in run 17 of 30
        load_config(spec.base, [*spec.overrides, *overrides, "seed=0"])
    return spec


# A method name is part of its runs' directory names (OUT/<method>-seed<S>): no separators,
# no leading dot, so that no name can reach outside --out or hide its runs.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _check_name(path: Path, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UserError(f"{path}: methods: {name!r}: a method name may hold letters, digits and . _ + - "
                        "(not first), as it names the run directories")


def _read_contrasts(path: Path, value, methods: list[str]) -> list[tuple[str, str]]:
    """`contrasts: ["ubsmoe - smoe", ...]`: the pairs whose per-seed differences are tabulated."""
    _check_strings(path, "contrasts", value)
    pairs = []
    for item in value:
        parts = [p.strip() for p in item.split(" - ")]
        if len(parts) != 2 or parts[0] == parts[1] or not all(p in methods for p in parts):
            raise UserError(f"{path}: contrasts: {item!r}: write 'A - B' with two different methods of the spec")
        pairs.append((parts[0], parts[1]))
    return pairs


def _check_strings(path: Path, field: str, value) -> None:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise UserError(f"{path}: {field}: a list of KEY=VALUE strings is required, got {value!r}")


def run_all(spec: Spec, out: Path, jobs: int, extra: list[str], force: bool = False,
            command: str = "fedmoe compare") -> dict[tuple[str, int], Path]:
    """Reuse, resume or start every (method, seed) run, `jobs` at a time (compare_runs.py)."""
    planned = plan_jobs(spec, out, extra, force)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    launch(planned, out, jobs, command)
    return {(job.method, job.seed): job.run for job in planned}


def finished_part(spec: Spec, out: Path, extra: list[str]) -> tuple[Spec, dict, list[str]]:
    """For `--report-only`: the spec cut to the methods whose every seed has finished (with the
    same config), their runs, and the methods still pending. Trains nothing."""
    jobs = plan_jobs(spec, out, extra, force=False)
    done = [m for m in spec.methods if all(j.command is None for j in jobs if j.method == m)]
    if not done:
        raise UserError(f"{out}: no method of the spec has finished all its seeds yet; nothing to report")
    part = replace(spec, methods={m: spec.methods[m] for m in done},
                   reference=spec.reference if spec.reference in done else None,
                   contrasts=[(a, b) for a, b in spec.contrasts if a in done and b in done],
                   convergence_reference=tuple(m for m in spec.convergence_reference if m in done))
    pending = [m for m in spec.methods if m not in done]
    return part, {(j.method, j.seed): j.run for j in jobs if j.method in done}, pending


# ---------------------------------------------------------------------------------------------
# Tables and plots


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(spec: Spec, runs: dict[tuple[str, int], Path], scores: dict | None = None) -> dict:
    """Per method: per-tier final accuracy mean/std over seeds, average over tiers, cost, balance.
    `scores` ((method, seed) -> tier -> row, compare_rescore.py): the final accuracies to use
    instead of the runs' recorded ones, with their format failures."""
    result = {}
    for method in spec.methods:
        summaries = [load_summary(runs[(method, s)]) for s in spec.seeds]
        tiers = list(summaries[0]["tiers"])
        if scores is not None:
            for seed, summary in zip(spec.seeds, summaries):
                for t in tiers:
                    summary["tiers"][t]["final"] = scores[(method, seed)][t]["accuracy"]
        per_tier = {t: _mean_std([s["tiers"][t]["final"] for s in summaries]) for t in tiers}
        base = {t: float(np.mean([s["tiers"][t]["base"] for s in summaries])) for t in tiers}
        average = _mean_std([np.mean([s["tiers"][t]["final"] for t in tiers]) for s in summaries])
        last_evals = [_last_eval_stats(runs[(method, s)]) for s in spec.seeds]
        cost = {t: {k: float(np.mean([e[t][k] for e in last_evals if e.get(t, {}).get(k) is not None]))
                    for k in ("flops_vs_top", "train_flops_per_token", "step_seconds", "load_cv",
                              "dead_expert_share", "load_entropy")
                    if any(e.get(t, {}).get(k) is not None for e in last_evals)} for t in tiers}
        finals = {t: [s["tiers"][t]["final"] for s in summaries] for t in tiers}
        finals["average"] = [float(np.mean([s["tiers"][t]["final"] for t in tiers])) for s in summaries]
        result[method] = {"tiers": tiers, "accuracy": per_tier, "base": base, "average": average,
                          "seeds": list(spec.seeds), "finals": finals,
                          "ci95": {k: mean_interval(v).to_json() for k, v in finals.items()},
                          "cost": cost, "chance": summaries[0]["chance"],
                          "top_k": {t: summaries[0]["tiers"][t]["top_k"] for t in tiers},
                          "lora_rank": {t: summaries[0]["tiers"][t]["lora_rank"] for t in tiers}}
        if scores is not None:
            result[method]["format_failures"] = {
                t: float(np.mean([scores[(method, s)][t]["format_failures"] for s in spec.seeds])) for t in tiers}
    if spec.reference is not None:
        ref = result[spec.reference]["finals"]
        for method, r in result.items():
            r["paired_to"] = spec.reference
            r["paired"] = {k: paired_interval(v, ref[k]).to_json() for k, v in r["finals"].items()}
    for a, b in spec.contrasts:
        result[a].setdefault("contrasts", {})[b] = {
            k: paired_interval(v, result[b]["finals"][k]).to_json() for k, v in result[a]["finals"].items()}
    return result


def _last_eval_stats(run: Path) -> dict[str, dict]:
    out = {}
    for e in read_metrics(run):
        if e.get("event") == "eval":
            out[e["tier"]] = e
    return out


def _ci(iv: dict) -> str:
    """mean ± half-width in %; the mean alone when one seed gives no interval."""
    if iv["n"] < 2:
        return f"{100 * iv['mean']:.1f}"
    return f"{100 * iv['mean']:.1f} ± {100 * iv['half']:.1f}"


def _diff(iv: dict) -> str:
    """A paired difference in pp; bold when its interval excludes zero."""
    if iv["n"] < 2:
        return f"{100 * iv['mean']:+.1f}"
    text = f"{100 * iv['mean']:+.1f} ± {100 * iv['half']:.1f}"
    return f"**{text}**" if iv["excludes_zero"] else text


def markdown(spec: Spec, result: dict, command: str, rescored: str | None = None) -> str:
    """compare.md; `rescored`: the evaluation mode the final checkpoints were scored again in."""
    first = next(iter(result.values()))
    tiers = first["tiers"]
    n = len(spec.seeds)
    title = f"`{spec.path}` (base config `{spec.base}`)" if spec.path else f"`{spec.base}`"
    scored = (f" (final checkpoints scored in `{rescored}` mode"
              f"{': greedy generation, answer extraction; a generation with no valid answer is wrong' if rescored == 'generate' else ''})"
              if rescored else "")
    lines = [f"# Comparison: {title}", "",
             f"Seeds {spec.seeds}; final accuracy in %{scored}: mean ± half-width of its 95% confidence interval "
             f"over the {n} seeds (Student t, {n - 1} degree{'s' * (n != 2)} of freedom; standard deviations in "
             f"summary.json); chance {100 * first['chance']:.1f}%. Produced by:", "",
             f"```\n{command}\n```", ""]
    header = ["method", *[f"{t}" for t in tiers], "avg over tiers", "lowest-tier FLOPs vs top",
              "lowest-tier load CV", "lowest-tier dead experts"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    low = tiers[0]
    for method, r in result.items():
        cost = r["cost"].get(low, {})
        cells = [method, *[_ci(r["ci95"][t]) for t in tiers], _ci(r["ci95"]["average"]),
                 f"{cost.get('flops_vs_top', float('nan')):.2f}x", f"{cost.get('load_cv', float('nan')):.2f}",
                 f"{100 * cost.get('dead_expert_share', float('nan')):.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    if spec.reference is not None and len(result) > 1:
        ref = spec.reference
        lines += ["", f"Paired difference to `{ref}` in pp: per seed, the method's run minus `{ref}`'s run "
                  f"of the same seed (same data split, clients and evaluation prompts), mean ± half-width of "
                  f"the 95% t interval of the {n} differences; **bold**: the interval excludes zero.", ""]
        header = ["method", *tiers, "avg over tiers"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, r in result.items():
            if method != ref:
                lines.append("| " + " | ".join([method, *[_diff(r["paired"][t]) for t in tiers],
                                                _diff(r["paired"]["average"])]) + " |")
    if spec.contrasts:
        lines += ["", "Paired contrasts in pp: per seed, the first method's run minus the second's, mean ± "
                  f"half-width of the 95% t interval of the {n} differences; **bold**: the interval excludes zero.", ""]
        header = ["contrast", *tiers, "avg over tiers"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for a, b in spec.contrasts:
            iv = result[a]["contrasts"][b]
            lines.append("| " + " | ".join([f"{a} - {b}", *[_diff(iv[t]) for t in tiers], _diff(iv["average"])]) + " |")
    if rescored:
        lines += ["", "Format failures (share of prompts whose output holds no valid answer), %, mean over seeds:", "",
                  "| " + " | ".join(["method", *tiers]) + " |", "|" + "---|" * (len(tiers) + 1)]
        lines += ["| " + " | ".join([m, *[f"{100 * r['format_failures'][t]:.1f}" for t in tiers]]) + " |"
                  for m, r in result.items()]
    lines += ["", "Tier settings at evaluation (experts per token k / LoRA rank r):", ""]
    lines += [f"- {m}: " + ", ".join(f"{t} k={r['top_k'][t]} r={r['lora_rank'][t]}" for t in tiers)
              for m, r in result.items()]
    lines += ["",
        "Columns: per-tier accuracy of the final global model evaluated at the tier's setting; "
        "FLOPs are training FLOPs per token counted from routed experts (forward + backward); "
        "load CV is the coefficient of variation of routed tokens across experts, averaged over "
        "layers, in the last round; dead experts get under 10% of the uniform load.", ""]
    if rescored:  # the plots are of the recorded mode: compare.md's
        return "\n".join(lines)
    lines += ["![accuracy per tier](plots/accuracy_per_tier.png)", "",
        "![accuracy over rounds](plots/accuracy_over_rounds.png)", "",
        "![expert load](plots/expert_load.png)", "", "![FLOPs per tier](plots/flops_per_tier.png)", ""]
    return "\n".join(lines)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_all(spec: Spec, result: dict, runs: dict, out: Path) -> None:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    methods = list(result)
    tiers = result[methods[0]]["tiers"]
    # Per-tier accuracy bars.
    fig = Figure(figsize=(max(6, 1.1 * len(methods) * len(tiers) / 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        means = [result[m]["accuracy"][t][0] for t in tiers]
        halves = [np.nan_to_num(result[m]["ci95"][t]["half"]) for t in tiers]  # 95% CI over seeds
        ax.bar(np.arange(len(tiers)) + i * width, means, width, yerr=halves, label=m, capsize=2)
    ax.axhline(result[methods[0]]["chance"], ls="--", c="gray", lw=1, label="chance")
    ax.set_xticks(np.arange(len(tiers)) + 0.4 - width / 2, tiers)
    ax.set_ylabel("final accuracy (bars: 95% CI over seeds)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, plots / "accuracy_per_tier.png")
    # Accuracy (average over tiers) against round, mean over seeds.
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for m in methods:
        curves = []
        for s in spec.seeds:
            by_round: dict[int, list[float]] = {}
            for e in read_metrics(runs[(m, s)]):
                if e.get("event") == "eval":
                    by_round.setdefault(e["round"], []).append(e["accuracy"])
            curves.append({r: float(np.mean(v)) for r, v in by_round.items()})
        rounds = sorted(set.intersection(*(set(c) for c in curves)))  # evaluated in every seed
        ax.plot(rounds, [np.mean([c[r] for c in curves]) for r in rounds], marker=".", label=m)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy, average over tiers")
    ax.legend(fontsize=7)
    _save(fig, plots / "accuracy_over_rounds.png")
    # Expert-load heatmaps of the lowest tier for every sparse method (summed over the run, seed 0).
    sparse = [m for m in methods if result[m]["top_k"][tiers[0]] < max(result[m]["top_k"].values())]
    fig = Figure(figsize=(4 * max(1, len(sparse)), 3.2))
    for i, m in enumerate(sparse or methods[:1]):
        ax = fig.add_subplot(1, max(1, len(sparse)), i + 1)
        load = None
        for e in read_metrics(runs[(m, spec.seeds[0])]):
            if e.get("event") == "round" and tiers[0] in e.get("expert_load", {}):
                arr = np.asarray(e["expert_load"][tiers[0]], dtype=float)
                load = arr if load is None else load + arr
        if load is not None:
            im = ax.imshow(relative_load(load), aspect="auto", cmap="RdBu_r", vmin=0, vmax=2)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{m}: {tiers[0]} load / uniform", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, plots / "expert_load.png")
    # Training FLOPs per token per tier.
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for i, m in enumerate(methods):
        vals = [result[m]["cost"].get(t, {}).get("train_flops_per_token", np.nan) / 1e6 for t in tiers]
        ax.bar(np.arange(len(tiers)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(tiers)) + 0.4 - width / 2, tiers)
    ax.set_ylabel("training MFLOPs per token")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, plots / "flops_per_tier.png")


def compare(spec_path: Path, out: Path, jobs: int, extra: list[str], command: str, force: bool = False,
            report_only: bool = False, mode: str | None = None) -> Path:
    """Train (or reuse) every run of the spec and write compare.md, summary.json and plots; with
    `mode` other than the runs' eval.mode, score the final checkpoints again in it and write
    compare-MODE.md and summary-MODE.json instead."""
    spec = read_spec(spec_path)
    pending = []
    if report_only:
        spec, runs, pending = finished_part(spec, out, extra)
    else:
        runs = run_all(spec, out, jobs, extra, force, command)
    recorded = {load_config(run / "config.yaml").eval.mode for run in runs.values()}
    rescored = mode if mode is not None and recorded != {mode} else None
    scores = None
    if rescored:
        from pipeline.eval.compare_rescore import rescore

        scores = rescore(runs, rescored, out, jobs, command)
    result = summarise(spec, runs, scores)
    suffix = f"-{rescored}" if rescored else ""
    (out / f"summary{suffix}.json").write_text(json.dumps(result, indent=1))
    sections = []
    if not rescored:
        plot_all(spec, result, runs, out)
        from pipeline.eval.async_report import compare_section  # accuracy against virtual time
        from pipeline.eval.convergence import convergence_section  # FedSmoothLoRA's claim

        sections = compare_section(spec, runs, out, _save, lambda w, h: Figure(figsize=(w, h)))
        sections += convergence_section(spec, runs)
    path = out / f"compare{suffix}.md"
    text = markdown(spec, result, command, rescored)
    if pending:  # a partial report says so before its first table
        text = text.replace("\n\n| method |", f"\n\n**Partial**: not yet finished: {', '.join(pending)}.\n\n| method |", 1)
    path.write_text("\n".join([text, *sections]))
    console.print(path.read_text().split("\n\n![")[0])
    return path
