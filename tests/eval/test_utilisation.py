"""The report's GPU utilisation: the run's mean from the round events, and its plot."""
import json

import pytest

from pipeline.eval.report import write_report
from pipeline.eval.utilisation import mean_utilisation, placement_rounds

from tests.eval.test_report import _is_png, _write_run

# Two groups (1 and 3 GPUs): per round the measured busy seconds and the round's wall time.
ROUNDS = {1: ([4.0, 2.0], 5.0), 2: ([3.0, 3.0], 4.0), 3: ([1.0, 0.0], 2.0)}


def _placement(busy, wall):
    gpus = [1, 3]
    used = sum(b * g for b, g in zip(busy, gpus)) / (sum(gpus) * wall)
    return {"mode": "balanced", "groups": [[0], [1]], "gpus": gpus, "busy_seconds": busy,
            "predicted_seconds": busy, "utilisation": used, "predicted_utilisation": used}


def _with_placement(run):
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "round":
            busy, wall = ROUNDS[event["round"]]
            event.update(seconds=wall, placement=_placement(busy, wall))
        lines.append(json.dumps(event) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


def test_the_runs_utilisation_is_busy_gpu_seconds_over_gpus_times_the_summed_rounds(tmp_path):
    run = _with_placement(_write_run(tmp_path / "run"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    busy = sum(b[0] * 1 + b[1] * 3 for b, _ in ROUNDS.values())  # 4+6, 3+9, 1+0
    want = busy / (4 * sum(w for _, w in ROUNDS.values()))
    assert mean_utilisation(events) == pytest.approx(want)
    assert list(placement_rounds(events)) == [1, 2, 3]
    text = write_report(run).read_text()
    assert f"- GPU utilisation (busy GPU-seconds / GPUs x round time): {want:.0%}" in text
    assert "(plots/utilisation.png)" in text and _is_png(run / "plots" / "utilisation.png")


def test_a_run_without_placement_records_still_gets_its_plot(tmp_path):
    run = _write_run(tmp_path / "run")
    text = write_report(run).read_text()
    assert "GPU utilisation (busy" not in text
    assert _is_png(run / "plots" / "utilisation.png")


def test_a_run_resumed_under_fewer_groups_still_gets_its_plot(tmp_path):
    # Rounds 1-2 under two groups, round 3 resumed in one process: one group from then on.
    run = _with_placement(_write_run(tmp_path / "run"))
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "round" and event["round"] == 3:
            event["placement"].update(groups=[[0, 1]], gpus=[1], busy_seconds=[2.0], predicted_seconds=[2.0])
        lines.append(json.dumps(event) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    write_report(run)
    assert _is_png(run / "plots" / "utilisation.png")
