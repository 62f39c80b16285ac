"""Asynchronous runs in the report and in `fedmoe compare` (docs/async.md): accuracy against
virtual time per tier, each tier's share of the aggregated updates (participation fairness), a
staleness histogram, and the virtual time a method takes to reach a synchronous run's accuracy.

A synchronous run has no clock of its own; on the same virtual clock its round r lasts as long
as its slowest sampled client (the round waits for it), so its time axis is computed from its
config: the clients each round sampled, their tiers' step costs and speeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.eval.metrics import read_metrics


def run_config(run_dir: Path):
    from pipeline.config import load_config

    return load_config(Path(run_dir) / "config.yaml")


def is_async(run_dir: Path) -> bool:
    from pipeline.errors import UserError

    try:
        return run_config(run_dir).federation.mode == "async"
    except (UserError, OSError):  # no readable config.yaml: not a run this code can call async
        return False


def tier_durations(cfg) -> dict[str, float]:
    """Each tier's client duration on the virtual clock: local steps * step cost / speed."""
    from transformers import AutoConfig

    from pipeline.config import resolve_tiers
    from pipeline.federation.clock import tier_step_costs
    from pipeline.federation.inputs import resolve_source

    mcfg = AutoConfig.from_pretrained(resolve_source(cfg.model.source))
    tiers = resolve_tiers(cfg, mcfg.num_experts, mcfg.num_experts_per_tok)
    costs = tier_step_costs(mcfg, tiers, cfg.model.lora.rank, cfg.train.max_length,
                            cfg.model.lora.experts, cfg.model.lora.attention)
    return {t.name: cfg.train.local_steps * c / cfg.tiers[t.index].speed for t, c in zip(tiers, costs)}


def sync_block_times(cfg) -> dict[int, float]:
    """Round -> virtual time at its end for a synchronous run (a round waits for its slowest client)."""
    from pipeline.config import Tier
    from pipeline.federation.sampling import assign_tiers, sample_clients

    durations = tier_durations(cfg)
    tiers = [Tier(i, t.name, t.budget, 1, 1, t.share) for i, t in enumerate(cfg.tiers)]
    client_tiers = assign_tiers(cfg.federation.clients, tiers, cfg.seed)
    fed, t, out = cfg.federation, 0.0, {0: 0.0}
    for r in range(1, fed.rounds + 1):
        clients = sample_clients(fed.clients, fed.clients_per_round, cfg.seed, r)
        t += max(durations[client_tiers[c].name] for c in clients)
        out[r] = t
    return out


def block_times(run_dir: Path, events: list[dict] | None = None) -> dict[int, float]:
    events = read_metrics(run_dir) if events is None else events
    blocks = {e["round"]: e["virtual_time"] for e in events if e.get("event") == "block"}
    return blocks or sync_block_times(run_config(run_dir))


def accuracy_vs_time(run_dir: Path, events: list[dict] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per tier and for the average over tiers ("average"): (virtual time, accuracy) per evaluation."""
    events = read_metrics(run_dir) if events is None else events
    times = block_times(run_dir, events)
    curves: dict[str, dict[int, float]] = {}
    for e in events:
        if e.get("event") == "eval" and e["round"] in times:
            curves.setdefault(e["tier"], {})[e["round"]] = e["accuracy"]
    rounds = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    out = {tier: [(times[r], c[r]) for r in sorted(c)] for tier, c in curves.items()}
    out["average"] = [(times[r], float(np.mean([c[r] for c in curves.values()]))) for r in rounds]
    return out


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first evaluation's virtual time at which the accuracy reaches `target` (None: never)."""
    return next((t for t, acc in curve if acc >= target - 1e-12), None)


def participation(run_dir: Path, events: list[dict] | None = None) -> dict:
    """Updates aggregated per tier, their shares, and the staleness histogram. For a synchronous
    run: the clients each round trained (staleness 0)."""
    events = read_metrics(run_dir) if events is None else events
    aggs = [e for e in events if e.get("event") == "aggregate"]
    counts: dict[str, int] = {}
    stale: dict[int, int] = {}
    if aggs:
        for a in aggs:
            ok = set(a.get("accepted", a["seqs"]))
            for seq, tier, tau in zip(a["seqs"], a["tiers"], a["staleness"]):
                if seq in ok:
                    counts[tier] = counts.get(tier, 0) + 1
                    stale[tau] = stale.get(tau, 0) + 1
    else:
        for e in events:
            if e.get("event") == "client":
                counts[e["tier"]] = counts.get(e["tier"], 0) + 1
                stale[0] = stale.get(0, 0) + 1
    total = sum(counts.values()) or 1
    weighted = [a["strategy"]["tier_weight"] for a in aggs if "tier_weight" in a.get("strategy", {})]
    weight = ({t: sum(w.get(t, 0.0) for w in weighted) / len(weighted) for t in counts} if weighted else None)
    return {"updates": counts, "share": {t: n / total for t, n in counts.items()},
            "staleness": dict(sorted(stale.items())), "aggregations": len(aggs),
            "weight_share": weight}  # AlignFed: each tier's mean share of an aggregation's weight


# ---------------------------------------------------------------------------------------------
# One run's report


def write_async_plots(run_dir: Path, plots: Path, new_figure, save) -> list[str]:
    """plots/accuracy_vs_time.png and plots/async_updates.png; the report's lines about them."""
    events = read_metrics(run_dir)
    curves = accuracy_vs_time(run_dir, events)
    part = participation(run_dir, events)
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for tier, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker=".", label=tier, ls="--" if tier == "average" else "-")
    ax.set_xlabel("virtual time")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    save(fig, plots / "accuracy_vs_time.png")
    fig = new_figure(8.0, 3.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    tiers = list(part["share"])
    left.bar(tiers, [part["share"][t] for t in tiers])
    left.set_ylabel("share of aggregated updates")
    right.bar([str(k) for k in part["staleness"]], list(part["staleness"].values()))
    right.set_xlabel("staleness (versions)")
    right.set_ylabel("updates")
    save(fig, plots / "async_updates.png")
    taus = [k for k, n in part["staleness"].items() for _ in range(n)]
    lines = ["## Asynchronous", "",
             f"- {part['aggregations']} aggregations of {sum(part['updates'].values())} updates, "
             f"mean staleness {np.mean(taus) if taus else 0:.2f} versions (max {max(taus, default=0)})",
             "- share of aggregated updates per tier: "
             + ", ".join(f"{t} {100 * s:.0f}%" for t, s in part["share"].items()),
             *(["- mean share of an aggregation's weight per tier: "
                + ", ".join(f"{t} {100 * s:.0f}%" for t, s in part["weight_share"].items())]
               if part["weight_share"] else []),
             "", "![accuracy against virtual time](plots/accuracy_vs_time.png)", "",
             "![updates per tier and staleness](plots/async_updates.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# fedmoe compare


def compare_section(spec, runs: dict, out: Path, save, figure) -> list[str]:
    """compare.md's asynchronous section (when a method runs async): per method, the virtual time
    to reach the reference's final accuracy (average over tiers, same seed), the final virtual
    time, the slowest tier's share of updates; plots/accuracy_vs_virtual_time.png."""
    methods = list(spec.methods)
    if not any(is_async(runs[(m, spec.seeds[0])]) for m in methods):
        return []
    cfg = run_config(runs[(methods[0], spec.seeds[0])])
    durations = tier_durations(cfg)
    slowest = max(durations, key=durations.get)
    curves = {(m, s): accuracy_vs_time(runs[(m, s)])["average"] for m in methods for s in spec.seeds}
    reference = spec.reference or methods[0]
    rows = []
    for m in methods:
        reach, ends, shares, finals, weights = [], [], [], [], []
        for s in spec.seeds:
            target = curves[(reference, s)][-1][1]
            reach.append(time_to_reach(curves[(m, s)], target))
            ends.append(curves[(m, s)][-1][0])
            finals.append(curves[(m, s)][-1][1])
            part = participation(runs[(m, s)])
            shares.append(part["share"].get(slowest, 0.0))
            if part["weight_share"] is not None:
                weights.append(part["weight_share"].get(slowest, 0.0))
        got = [r for r in reach if r is not None]
        mode = "async" if is_async(runs[(m, spec.seeds[0])]) else "sync"
        reached = f"{np.mean(got):.1f} ({len(got)}/{len(reach)} seeds)" if got else f"never (0/{len(reach)})"
        weight = f"{100 * np.mean(weights):.0f}%" if weights else "-"
        rows.append(f"| {m} | {mode} | {reached} | {np.mean(ends):.1f} | {100 * np.mean(finals):.1f} "
                    f"| {100 * np.mean(shares):.0f}% | {weight} |")
    fig = figure(7, 4)
    ax = fig.add_subplot()
    for m in methods:
        n = min(len(curves[(m, s)]) for s in spec.seeds)
        xs = [np.mean([curves[(m, s)][i][0] for s in spec.seeds]) for i in range(n)]
        ys = [np.mean([curves[(m, s)][i][1] for s in spec.seeds]) for i in range(n)]
        ax.plot(xs, ys, marker=".", label=m)
    ax.set_xlabel("virtual time (mean over seeds)")
    ax.set_ylabel("accuracy, average over tiers")
    ax.legend(fontsize=7)
    save(fig, out / "plots" / "accuracy_vs_virtual_time.png")
    speeds = ", ".join(f"{t.name} {t.speed:g}" for t in cfg.tiers)
    return ["## Asynchronous", "",
            f"Tier speeds {speeds}; slowest tier on the virtual clock: {slowest}. A synchronous "
            "round lasts as long as its slowest sampled client. Time to reach: the first evaluation "
            f"at which the average over tiers reaches {reference}'s final accuracy of the same seed "
            "(mean over the seeds that reach it). Share of the weight: AlignFed's fairness weights, "
            "the tier's mean share per aggregation.", "",
            f"| method | mode | time to reach {reference}'s final | final virtual time | final avg accuracy "
            f"| {slowest}'s share of updates | {slowest}'s share of the weight |", "|---|---|---|---|---|---|---|",
            *rows, "",
            "![accuracy against virtual time](plots/accuracy_vs_virtual_time.png)", ""]
