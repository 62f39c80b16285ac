"""The training loss over every local step of a run, across rounds (FedSmoothLoRA's Figure 1c
view): `plots/step_loss.png` of a run's report, and the mean jump at round starts.

Each `client` event of metrics.jsonl carries `losses`, its loss at every local step. Per tier
(and over all clients), round t's curve is the mean over the round's clients of the loss at each
step, placed at x = (t - 1) * steps + step, so a method whose next round restarts from a
different point (a fresh LoRA, a merged backbone) shows a jump at every round boundary. The jump
of round t is the mean first-step loss of round t minus the mean last-step loss of round t - 1
(the clients differ between rounds when they are sampled, so this is a population view).
Events written before per-step losses were recorded have none and are left out.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

ALL = "all clients"


def step_losses(events: list[dict]) -> dict[str, dict[int, list[list[float]]]]:
    """Tier (and ALL) -> round -> each client's per-step losses."""
    out: dict[str, dict[int, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        losses, round_ = e.get("losses"), e.get("round")
        if e.get("event") != "client" or not isinstance(round_, int) or not isinstance(losses, list):
            continue
        if not losses or not all(isinstance(x, (int, float)) for x in losses):
            continue
        for key in (str(e.get("tier", "?")), ALL):
            out[key][round_].append([float(x) for x in losses])
    return out


def mean_curves(rounds: dict[int, list[list[float]]]) -> dict[int, np.ndarray]:
    """Round -> the mean over its clients of the loss at each step (the shortest client's steps)."""
    out = {}
    for round_, clients in sorted(rounds.items()):
        steps = min(len(c) for c in clients)
        out[round_] = np.mean([c[:steps] for c in clients], axis=0)
    return out


def round_start_jumps(rounds: dict[int, list[list[float]]]) -> dict[int, float]:
    """Round t -> mean first-step loss of round t minus mean last-step loss of round t - 1."""
    curves = mean_curves(rounds)
    return {t: float(curves[t][0] - curves[t - 1][-1]) for t in curves if t - 1 in curves}


def jump_summary(events: list[dict]) -> dict[str, float | None]:
    """Tier (and ALL) -> the mean jump at round starts (None with fewer than two rounds)."""
    out = {}
    for key, rounds in step_losses(events).items():
        jumps = list(round_start_jumps(rounds).values())
        out[key] = float(np.mean(jumps)) if jumps else None
    return out


def plot_step_loss(events: list[dict], tiers: list[str], fig, path: Path, save) -> None:
    """Per tier and over all clients: the mean loss at every local step, rounds side by side."""
    data = step_losses(events)
    keys = [t for t in tiers if t in data] + ([ALL] if ALL in data else [])
    if not keys:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no per-step losses recorded", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        return save(fig, path)
    ax = fig.add_subplot()
    steps = max(len(c) for rounds in data.values() for clients in rounds.values() for c in clients)
    for key in keys:
        color = "black" if key == ALL else None  # a tier keeps the colour of its first round
        for i, (round_, curve) in enumerate(mean_curves(data[key]).items()):
            x = (round_ - 1) * steps + np.arange(1, len(curve) + 1)
            line, = ax.plot(x, curve, color=color, linewidth=2 if key == ALL else 1, label=key if i == 0 else None)
            color = line.get_color()
    for round_ in sorted({r for rounds in data.values() for r in rounds})[1:]:
        ax.axvline((round_ - 1) * steps + 0.5, color="gray", linewidth=0.5, linestyle=":")
    ax.set_xlabel(f"local step ({steps} per round; dotted: round starts)")
    ax.set_ylabel("mean client train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
