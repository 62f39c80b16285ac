"""compare.md's convergence section: FedSmoothLoRA's claim is faster and smoother convergence
than FedAvgLoRA, so per method it gives the rounds to reach each reference method's final
training loss (the spec's `convergence_reference`, one name or several, else its `reference`)
and the mean jump of the training loss at round starts (step_loss.py).

A round's training loss is the mean over the round's clients of each client's mean loss over its
local steps (`train_loss` of its `client` event): a population view, since the sampled clients
differ between rounds. The reference's final training loss is its last round's, of the same seed.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.eval.metrics import read_metrics
from pipeline.eval.stats import mean_interval, paired_interval
from pipeline.eval.step_loss import ALL, jump_summary


def round_train_loss(events: list[dict]) -> dict[int, float]:
    """Round -> the mean `train_loss` of its clients."""
    rounds: dict[int, list[float]] = defaultdict(list)
    for e in events:
        loss, round_ = e.get("train_loss"), e.get("round")
        if e.get("event") == "client" and isinstance(round_, int) and isinstance(loss, (int, float)):
            rounds[round_].append(float(loss))
    return {r: float(np.mean(v)) for r, v in sorted(rounds.items())}


def rounds_to_reach(curve: dict[int, float], target: float) -> int | None:
    """The first round whose training loss is at or below `target`; None if none is."""
    return next((r for r, loss in sorted(curve.items()) if loss <= target), None)


def _references(spec) -> list[str]:
    """The spec's `convergence_reference` names, else its `reference`, else its first method."""
    named = getattr(spec, "convergence_reference", None) or ()
    named = [named] if isinstance(named, str) else list(named)
    return named or [spec.reference or list(spec.methods)[0]]


def _interval(values: list[float]) -> str:
    return _text(mean_interval(values))


def _text(iv) -> str:
    return f"{iv.mean:+.3f}" if iv.n < 2 else f"{iv.mean:+.3f} ± {iv.half:.3f}"


def convergence_rows(spec, runs: dict[tuple[str, int], Path]) -> list[dict] | None:
    """Per method: rounds to reach each reference's final training loss (reference -> per seed,
    None: never), its own final training loss and its mean jump at round starts, per seed. None
    when the runs recorded no client losses."""
    methods = list(spec.methods)
    events = {key: read_metrics(run) for key, run in runs.items()}
    curves = {key: round_train_loss(ev) for key, ev in events.items()}
    if not all(curves.values()):
        return None
    references = _references(spec)
    rows = []
    for m in methods:
        reach, finals, jumps = {ref: [] for ref in references}, [], []
        for s in spec.seeds:
            curve = curves[(m, s)]
            for ref in references:
                reach[ref].append(rounds_to_reach(curve, curves[(ref, s)][max(curves[(ref, s)])]))
            finals.append(curve[max(curve)])
            jump = jump_summary(events[(m, s)]).get(ALL)
            if jump is not None:
                jumps.append(jump)
        rows.append({"method": m, "reach": reach, "final_loss": finals, "jumps": jumps,
                     "rounds": max(max(curves[(m, s)]) for s in spec.seeds)})
    return rows


def convergence_section(spec, runs: dict[tuple[str, int], Path]) -> list[str]:
    rows = convergence_rows(spec, runs)
    if rows is None:
        return []
    references = _references(spec)
    n_rounds = max(row["rounds"] for row in rows)  # read once, by convergence_rows
    lines = ["", "## Convergence", "",
             f"Training loss of a round: the mean over its clients of their mean loss over the local steps. "
             f"Rounds to reach X: the first round at or below X's last-round training loss of the "
             f"same seed (mean over the seeds that reach it, of {n_rounds} rounds). Jump: a round's mean "
             "first-step loss minus the previous round's mean last-step loss, averaged over round starts "
             "(mean ± half-width of the 95% t interval over seeds); a method that restarts each round from "
             "another point than where its clients ended jumps up.", "",
             "| method | " + "".join(f"rounds to reach {ref}'s final training loss | " for ref in references)
             + "final training loss | mean loss jump at round starts |", "|---" * (3 + len(references)) + "|"]
    for row in rows:
        reached = "".join(f"{_reached(row['reach'][ref])} | " for ref in references)
        jumps = _interval(row["jumps"]) if row["jumps"] else "-"
        lines.append(f"| {row['method']} | {reached}{np.mean(row['final_loss']):.3f} | {jumps} |")
    return lines + _contrast_lines(getattr(spec, "contrasts", ()), {row["method"]: row for row in rows})


def _contrast_lines(contrasts, rows: dict[str, dict]) -> list[str]:
    """The spec's contrasts as paired per-seed differences of final training loss and mean jump."""
    pairs = [(a, b) for a, b in contrasts
             if a in rows and b in rows and len(rows[a]["jumps"]) == len(rows[b]["jumps"]) > 0]
    if not pairs:
        return []
    lines = ["", "Contrasts: per seed, the first method's value minus the second's (mean ± half-width of the "
             "95% t interval; **bold**: the interval excludes zero).", "",
             "| contrast | final training loss | mean loss jump at round starts |", "|---|---|---|"]
    for a, b in pairs:
        cells = [paired_interval(rows[a][key], rows[b][key]) for key in ("final_loss", "jumps")]
        text = [f"**{_text(iv)}**" if iv.excludes_zero else _text(iv) for iv in cells]
        lines.append(f"| {a} - {b} | {text[0]} | {text[1]} |")
    return lines


def _reached(reach: list[int | None]) -> str:
    got = [r for r in reach if r is not None]
    return f"{np.mean(got):.1f} ({len(got)}/{len(reach)} seeds)" if got else f"never (0/{len(reach)})"
