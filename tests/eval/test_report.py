"""report.md, plots and load_summary on a hand-written run directory."""
import json

import numpy as np
import pytest
import yaml

from pipeline.eval.balance import LOW_LOAD, balance_stats
from pipeline.eval.report import write_report
from pipeline.eval.summary import load_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Accuracy per tier and round (round 0 = base model).
ACC = {"low": {0: 0.25, 1: 0.30, 2: 0.45, 3: 0.40}, "high": {0: 0.35, 1: 0.50, 2: 0.55, 3: 0.60}}
TOP_K = {"low": 1, "high": 4}
FAMILIES = {"low": {"boolq": 0.5, "piqa": 0.3}, "high": {"boolq": 0.7, "piqa": 0.5}}
# [layers=2, experts=4] routed-token counts of one round; rounds add them up.
LOAD = {"low": [[[10, 0, 5, 25], [10, 10, 10, 10]], [[20, 1, 5, 14], [0, 0, 0, 0]],
                 [[0, 0, 0, 0], [4, 4, 4, 28]]],
        "high": [[[40, 40, 40, 40], [80, 40, 20, 20]]] * 3}


def _event(event, t, **fields):
    return json.dumps({"event": event, **fields, "time": t}) + "\n"


def _write_run(run_dir, rounds=3, config=True, chance_in_events=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    if config:
        cfg = {"seed": 0, "algorithm": {"name": "smoe", "options": {}},
               "tiers": [{"name": "low", "budget": 0.25}, {"name": "high", "budget": 1.0}]}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [_event("run", 100.0, status="started", round=0)]
    for r in range(rounds + 1):
        if r > 0:
            for c, tier in enumerate(["low", "high"]):
                lines.append(_event("client", 100.0 + r, round=r, client=c, tier=tier, top_k=TOP_K[tier],
                                    train_loss=2.0 / r + c, steps=3, n_samples=10, seconds=0.5))
            lines.append(_event("client", 100.0 + r, round=r, client=2, tier="low", top_k=1,
                                train_loss=4.0 / r, steps=3, n_samples=10, seconds=0.5))
            lines.append(_event("round", 100.0 + r, round=r, seconds=10.0, clients=[0, 1, 2],
                                expert_load={t: LOAD[t][r - 1] for t in LOAD}))
        for tier in ("low", "high"):
            extra = {"chance": 0.25} if chance_in_events else {}
            lines.append(_event("eval", 100.0 + r, round=r, tier=tier, top_k=TOP_K[tier], lora_rank=4,
                                accuracy=ACC[tier][r], loss=1.0 - ACC[tier][r],
                                per_family=FAMILIES[tier] if r == rounds else {}, **extra))
    if rounds >= 2:
        lines.append(_event("reject", 120.0, round=2, client=5, reason="non-finite values in x"))
    lines.append(_event("run", 160.0, status="finished", round=rounds))
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    return run_dir


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1000


def test_report_numbers(tmp_path):
    run = _write_run(tmp_path / "run")
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    assert text.startswith("# fedmoe report: smoe")
    for tier, acc in ACC.items():
        base, final, best = acc[0], acc[3], max(acc.values())
        best_round = max(acc, key=acc.get)
        row = (f"| {tier} | {TOP_K[tier]} | {base * 100:.2f}% | {final * 100:.2f}% | "
               f"{best * 100:.2f}% (round {best_round}) | {(final - base) * 100:+.2f} pp |")
        assert row in text
    assert "| boolq | 50.00% | 70.00% |" in text  # per family, tiers in config order
    assert "| piqa | 30.00% | 50.00% |" in text
    assert "chance = 25.00%" in text
    assert "30.0 s" in text  # three rounds of 10 s
    assert "rejected client updates: 1" in text
    for name in ("accuracy", "expert_load", "train_loss"):
        assert f"(plots/{name}.png)" in text
        assert _is_png(run / "plots" / f"{name}.png")


def test_summary_numbers(tmp_path):
    summary = load_summary(_write_run(tmp_path / "run"))
    assert summary["algorithm"] == "smoe" and summary["status"] == "finished"
    assert list(summary["tiers"]) == ["low", "high"]
    assert summary["base"] == {t: ACC[t][0] for t in ACC}
    assert summary["final"] == {t: ACC[t][3] for t in ACC}
    assert summary["tiers"]["low"]["change"] == pytest.approx(ACC["low"][3] - ACC["low"][0])
    assert summary["tiers"]["low"]["best_round"] == 2
    assert summary["chance"] == 0.25
    assert summary["rounds"] == 3
    json.dumps(summary)  # reusable by a compare command: plain values only


def _direct_balance(load):
    """The definition, written out one layer at a time."""
    cvs, low = [], []
    for layer in load:
        if layer.sum() == 0:
            continue
        uniform = layer.sum() / len(layer)
        cvs.append(np.std(layer) / np.mean(layer))
        low.extend(layer < LOW_LOAD * uniform)
    return float(np.mean(cvs)), float(np.mean(low))


def test_balance_stats_match_numpy(tmp_path):
    load = np.array([[10, 0, 5, 25], [1, 1, 1, 1], [0, 0, 0, 0], [3, 100, 0.5, 2]], dtype=float)
    stats = balance_stats(load)
    cv, low = _direct_balance(load)
    assert stats["cv"] == pytest.approx(cv)
    assert stats["low_load_share"] == pytest.approx(low)
    assert stats["low_load_share"] == pytest.approx(3 / 12)  # 0 and 0.5 and 2 of 26.375 mean
    assert balance_stats(np.zeros((2, 3)))["cv"] is None

    # And through the report: loads are summed over the run before the stats.
    summary = load_summary(_write_run(tmp_path / "run"))
    for tier, rounds in LOAD.items():
        total = np.sum(np.array(rounds, dtype=float), axis=0)
        cv, low = _direct_balance(total)
        assert summary["balance"][tier]["cv"] == pytest.approx(cv)
        assert summary["balance"][tier]["low_load_share"] == pytest.approx(low)
    assert summary["balance"]["high"]["cv"] == pytest.approx(
        np.mean([0.0, np.std([80, 40, 20, 20]) / 40]))
    text = write_report(tmp_path / "run").read_text()
    assert f"| high | 480 | {summary['balance']['high']['cv']:.3f} | 0.0% |" in text


def test_base_only_run(tmp_path):
    run = _write_run(tmp_path / "run", rounds=0, config=False, chance_in_events=False)
    text = write_report(run).read_text()
    assert text.startswith("# fedmoe report: unknown algorithm")
    assert "| low | 1 | 25.00% | 25.00% | 25.00% (round 0) | +0.00 pp |" in text
    assert "No training rounds recorded yet." in text
    for name in ("accuracy", "expert_load", "train_loss"):
        assert _is_png(run / "plots" / f"{name}.png")


def test_empty_and_incomplete_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "No evaluations recorded yet." in text
    assert _is_png(empty / "plots" / "accuracy.png")

    run = _write_run(tmp_path / "killed")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    # Killed mid-write after round 2's evals: the torn line is ignored, final = round 2.
    cut = next(i for i, l in enumerate(lines) if '"round": 3' in l)
    (run / "metrics.jsonl").write_text("".join(lines[:cut]) + lines[cut][:15])
    summary = load_summary(run)
    assert summary["status"] == "incomplete"
    assert summary["final"] == {t: ACC[t][2] for t in ACC}
    write_report(run)
