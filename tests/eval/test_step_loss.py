"""Per-step training losses across rounds: the curve means, the round-start jumps, the report."""
import json

import numpy as np
import pytest

from pipeline.eval.report import write_report
from pipeline.eval.summary import load_summary
from pipeline.eval.step_loss import ALL, jump_summary, mean_curves, round_start_jumps, step_losses

EVENTS = [
    {"event": "client", "round": 1, "client": 0, "tier": "low", "losses": [3.0, 2.0, 1.0]},
    {"event": "client", "round": 1, "client": 1, "tier": "high", "losses": [3.0, 2.5, 2.0]},
    {"event": "client", "round": 2, "client": 0, "tier": "low", "losses": [2.0, 1.5, 0.5]},
    {"event": "client", "round": 2, "client": 2, "tier": "high", "losses": [1.5, 1.0, 1.0]},
    {"event": "client", "round": 3, "client": 1, "tier": "high", "losses": [1.0, 0.5, 0.25]},
    {"event": "client", "round": 3, "client": 3, "tier": "high", "train_loss": 9.0},  # no per-step losses
]


def test_jumps_are_first_step_of_a_round_minus_last_of_the_previous():
    data = step_losses(EVENTS)
    assert mean_curves(data[ALL])[1].tolist() == [3.0, 2.25, 1.5]
    assert round_start_jumps(data[ALL]) == {2: pytest.approx(1.75 - 1.5), 3: pytest.approx(1.0 - 0.75)}
    assert round_start_jumps(data["low"]) == {2: pytest.approx(2.0 - 1.0)}  # round 3 has no low client
    jumps = jump_summary(EVENTS)
    assert jumps["high"] == pytest.approx(((1.5 - 2.0) + (1.0 - 1.0)) / 2)
    assert jump_summary(EVENTS[:1]) == {"low": None, ALL: None}


def test_report_plots_the_steps_and_states_the_jump(tmp_path):
    events = [{"train_loss": 1.0, **e, "time": 1.0} for e in EVENTS]  # as the round loop logs them
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    write_report(tmp_path)
    assert (tmp_path / "plots" / "step_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_summary(tmp_path)["loss_jump"][ALL] == pytest.approx(0.25)  # both rounds jump by 0.25
    assert "jump at round starts" in (tmp_path / "report.md").read_text()


def _run(path, round_losses, steps=(2.0, 1.0)):
    """A run whose round r has one client with mean loss round_losses[r - 1]; its per-step losses
    are `steps` shifted to that mean."""
    path.mkdir()
    events = []
    for r, loss in enumerate(round_losses, start=1):
        shift = loss - sum(steps) / len(steps)
        events.append({"event": "client", "round": r, "tier": "t", "train_loss": loss,
                       "losses": [x + shift for x in steps], "time": float(r)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_convergence_rows_count_rounds_to_the_references_final_loss_per_seed(tmp_path):
    from types import SimpleNamespace

    from pipeline.eval.convergence import convergence_rows, convergence_section, round_train_loss, rounds_to_reach

    spec = SimpleNamespace(methods={"ref": [], "fast": []}, seeds=[0, 1], reference="ref")
    runs = {("ref", 0): _run(tmp_path / "r0", [3.0, 2.0, 1.5]), ("ref", 1): _run(tmp_path / "r1", [3.0, 2.5, 1.0]),
            ("fast", 0): _run(tmp_path / "f0", [2.0, 1.4, 1.2]), ("fast", 1): _run(tmp_path / "f1", [2.0, 1.8, 1.1])}
    assert round_train_loss(json.loads(line) for line in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()) \
        == {1: 3.0, 2: 2.0, 3: 1.5}
    assert rounds_to_reach({1: 3.0, 2: 1.5, 3: 1.0}, 1.5) == 2 and rounds_to_reach({1: 3.0}, 1.0) is None
    rows = {row["method"]: row for row in convergence_rows(spec, runs)}
    assert rows["ref"]["reach"] == {"ref": [3, 3]}
    assert rows["fast"]["reach"] == {"ref": [2, None]}  # seed 1: 1.1 never reaches the reference's 1.0
    assert rows["fast"]["final_loss"] == [1.2, 1.1]
    # jumps: first step of round t (mean + 0.5) minus last step of round t - 1 (mean - 0.5)
    assert rows["ref"]["jumps"] == [pytest.approx(((2.0 - 3.0) + (1.5 - 2.0)) / 2 + 1.0),
                                    pytest.approx(((2.5 - 3.0) + (1.0 - 2.5)) / 2 + 1.0)]
    text = "\n".join(convergence_section(spec, runs))
    assert "| fast | 2.0 (1/2 seeds) | 1.150 |" in text and "| ref | 3.0 (2/2 seeds) | 1.250 |" in text
    assert "| contrast |" not in text  # the spec names none
    spec.contrasts = [("fast", "ref")]
    text = "\n".join(convergence_section(spec, runs))
    diffs = [1.2 - 1.5, 1.1 - 1.0]  # final losses, per seed
    half = 12.706204736174703 * np.std(diffs, ddof=1) / np.sqrt(2)
    assert f"| fast - ref | {np.mean(diffs):+.3f} ± {half:.3f} | " in text


def test_convergence_counts_rounds_to_each_convergence_reference_the_spec_names(tmp_path):
    from types import SimpleNamespace

    from pipeline.eval.convergence import convergence_rows, convergence_section

    spec = SimpleNamespace(methods={"ref": [], "fast": []}, seeds=[0], reference="ref", convergence_reference="fast")
    runs = {("ref", 0): _run(tmp_path / "r0", [3.0, 2.0, 1.5]), ("fast", 0): _run(tmp_path / "f0", [2.0, 1.4, 1.2])}
    rows = {row["method"]: row for row in convergence_rows(spec, runs)}
    assert rows["fast"]["reach"] == {"fast": [3]} and rows["ref"]["reach"] == {"fast": [None]}  # fast ends at 1.2
    spec.convergence_reference = ("fast", "ref")  # as read_spec gives it: one column per reference
    rows = {row["method"]: row for row in convergence_rows(spec, runs)}
    assert rows["ref"]["reach"] == {"fast": [None], "ref": [3]} and rows["fast"]["reach"] == {"fast": [3], "ref": [2]}
    text = "\n".join(convergence_section(spec, runs))
    assert "| method | rounds to reach fast's final training loss | rounds to reach ref's final training loss |" in text
    assert "| ref | never (0/1) | 3.0 (1/1 seeds) | 1.500 |" in text
