"""A run's numbers, read from `RUN/metrics.jsonl` (+ `RUN/config.yaml`) in one pass.

`load_summary(run_dir)` gives them as a plain JSON-able dict, which `fedmoe report` renders
(report.py) and `fedmoe compare` puts side by side (compare.py); neither needs more than this
module's numpy to get them. Works on partial runs (only the base eval, a killed run).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.eval.balance import balance_stats
from pipeline.eval.divergence import report_lines
from pipeline.eval.step_loss import jump_summary
from pipeline.eval.metrics import is_number, read_metrics


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
    phases: dict[str, float] = field(default_factory=dict)  # world rank 0's seconds per phase


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
            if is_number(event.get("chance")):
                data.chance = float(event["chance"])
        elif kind == "client" and _is_int(round_) and is_number(event.get("train_loss")):
            tier = str(event.get("tier", "?"))
            _add_tier(data, tier)
            data.train_loss[tier][round_].append(float(event["train_loss"]))
            data.clients.append(event)
        elif kind == "round" and _is_int(round_):
            if is_number(event.get("seconds")):
                data.round_seconds[round_] = float(event["seconds"])
            _add_load(data, event.get("expert_load") or {}, round_)
        elif kind == "timing":
            for phase, seconds in event.items():
                if phase not in ("event", "round", "time") and is_number(seconds):
                    data.phases[phase] = data.phases.get(phase, 0.0) + float(seconds)
        elif kind == "reject":
            data.rejects.append(event)
        elif kind == "run":
            data.runs.append(event)
            if is_number(event.get("load_seconds")):
                data.phases["load"] = data.phases.get("load", 0.0) + float(event["load_seconds"])
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
        if isinstance(section, dict) and is_number(section.get("chance")):
            return float(section["chance"])
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)




def relative_load(load: np.ndarray) -> np.ndarray:
    """Each cell's share of its layer's tokens times the number of experts (1 = uniform)."""
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    totals = load.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, load / totals * load.shape[1], np.nan)


def _tier_summary(rows: dict[int, dict]) -> dict:
    rounds = sorted(rows)
    scored = [r for r in rounds if is_number(rows[r].get("accuracy"))]
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


def summarise(data: RunData, run_dir: Path) -> dict:
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
                 "resumes": statuses.count("resumed"), "phases": dict(data.phases),
                 "peak_memory_gib": _peak_memory(data.clients)},
        "rejected": [{k: e.get(k) for k in ("round", "client", "reason")} for e in data.rejects],
        "warnings": report_lines(data.warnings),
        "loss_jump": jump_summary(data.clients),
    }


def _peak_memory(clients: list[dict]) -> dict[str, float]:
    """tier -> the largest peak memory (GiB) a client of it reported."""
    peaks: dict[str, float] = {}
    for e in clients:
        if is_number(e.get("peak_memory_gib")):
            tier = str(e.get("tier", "?"))
            peaks[tier] = max(peaks.get(tier, 0.0), float(e["peak_memory_gib"]))
    return peaks


def load_summary(run_dir: Path) -> dict:
    """Per-tier base/final/best accuracy, expert-load balance, run time; plain JSON-able values.

    Keys: algorithm, status, rounds, chance, tiers {tier: {top_k, lora_rank, base, final,
    final_round, best, best_round, change, final_loss, per_family, base_per_family}},
    base {tier: acc}, final {tier: acc}, balance {tier: balance_stats}, time, rejected,
    loss_jump {tier or "all clients": mean train-loss jump at round starts, or None}.
    """
    run_dir = Path(run_dir)
    return summarise(collect(run_dir), run_dir)
