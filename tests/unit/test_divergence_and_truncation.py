"""The divergence guard's rule on evaluation rows, and records cut before tokenization."""
import json
import math

from pipeline.config import TrainConfig, load_config
from pipeline.data import collate, load_tokenizer
from pipeline.data.commonsense import record_to_example
from pipeline.data.truncate import CHARS_PER_TOKEN
from pipeline.eval.divergence import Guard, report_lines
from pipeline.eval.metrics import MetricsLogger
from pipeline.federation.inputs import REPO_ROOT, load_federated_data

TINY = REPO_ROOT / "tests" / "fixtures" / "tiny_run.yaml"


def _row(round_, loss, accuracy, tier="low", chance=0.25):
    return {"round": round_, "tier": tier, "loss": loss, "accuracy": accuracy, "chance": chance}


def test_guard_warns_after_consecutive_divergent_evaluations():
    guard = Guard.for_run(TrainConfig(divergence_factor=1.5, divergence_evals=2))
    assert guard.observe([_row(0, 3.0, 0.5), _row(0, 3.0, 0.2, tier="weak")]) == []
    assert guard.observe([_row(1, 4.6, 0.5)]) == []  # one bad evaluation is not yet divergence
    assert guard.observe([_row(2, 4.0, 0.5)]) == []  # and the streak restarts after a good one
    assert guard.observe([_row(3, 4.6, 0.5)]) == []
    found = guard.observe([_row(4, 3.0, 0.2)])  # below chance, the base model was not
    assert found == [{"round": 4, "tier": "low", "reason": "accuracy 20.0% below chance 25.0%",
                      "evals": 2, "action": "warn"}]
    assert guard.observe([_row(5, math.nan, 0.5)])[0]["reason"] == "loss is nan"
    # A tier whose base model is below chance is not flagged for staying there.
    assert guard.observe([_row(1, 3.0, 0.2, tier="weak"), _row(2, 3.0, 0.2, tier="weak")]) == []


def test_generate_mode_rows_have_no_loss_and_are_judged_by_accuracy_alone():
    guard = Guard.for_run(TrainConfig(divergence_evals=1))
    assert guard.observe([_row(0, None, 0.5)]) == []
    assert guard.observe([_row(1, None, 0.6), _row(2, None, 0.5)]) == []
    assert guard.observe([_row(3, None, 0.1)])[0]["reason"] == "accuracy 10.0% below chance 25.0%"


def test_resumed_guard_replays_the_streak_from_metrics(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for row in (_row(0, 3.0, 0.5), _row(1, 5.0, 0.5)):
            log.log("eval", **row)
    guard = Guard.for_run(TrainConfig(on_divergence="stop", divergence_evals=2), tmp_path)
    found = guard.observe([_row(2, 5.0, 0.5)])
    assert found[0]["evals"] == 2 and found[0]["action"] == "stop"
    assert "> 1.5 x the base model's 3" in found[0]["reason"]
    lines = report_lines([{"event": "divergence", **found[0]}, {"event": "data", "truncated": 3}])
    assert lines[0] == "## Warnings" and "tier low, rounds 2-2" in lines[2] and "3 data record(s)" in lines[3]


def test_long_records_are_cut_before_tokenization_keeping_what_the_model_sees(tmp_path):
    records = json.loads((REPO_ROOT / "tests" / "fixtures" / "commonsense_tiny.json").read_text())
    long = dict(records[0], instruction="filler words " * 20_000 + records[0]["instruction"])
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records * 4 + [long]))
    cfg = load_config(TINY, ["data.source=commonsense", f"data.path={path}", "data.n_eval_per_family=1"])
    tokenizer = load_tokenizer(REPO_ROOT / "assets" / "tiny-olmoe")
    data = load_federated_data(cfg, tokenizer)
    assert data.truncated == 1
    cut = next(e for e in data.train_examples + data.eval_examples if "filler" in e.prompt)
    whole = record_to_example(long, "long record")
    assert len(cut.prompt) <= CHARS_PER_TOKEN * 512 and whole.prompt.endswith(cut.prompt)
    # What is trained (or scored), the last max_length tokens, is what the whole record gives.
    max_length = cfg.train.max_length if cut in data.train_examples else 512
    assert collate([cut], tokenizer, max_length)["input_ids"].equal(
        collate([whole], tokenizer, max_length)["input_ids"])
