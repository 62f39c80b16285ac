"""`fedmoe eval RUN --top-k K --mode M` on the shared finished tiny run."""
import json

import numpy as np
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """The run was made with one thread (tests/e2e/conftest.py); evaluating in this process
    with the same count makes its numbers bitwise comparable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_evals(run) -> dict[str, dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(e["round"] for e in events if e["event"] == "eval")
    return {e["tier"]: e for e in events if e["event"] == "eval" and e["round"] == last}


def test_eval_at_several_top_k(finished_run, tmp_path, capsys):
    # The CLI's main in this process, as test_bad_input runs it: a second interpreter costs ~10 s
    # (test_run.py runs `fedmoe eval` as a subprocess).
    assert main(["eval", str(finished_run), "--top-k", "2", "--top-k", "8", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [(r["tier"], r["top_k"]) for r in rows] == [("low", 2), ("low", 8), ("high", 2), ("high", 8)]
    final = _final_evals(finished_run)
    by = {(r["tier"], r["top_k"]): r for r in rows}
    # At a tier's own top-k the run's last evaluation is reproduced exactly.
    for tier, own in (("low", 2), ("high", 8)):
        assert by[(tier, own)]["accuracy"] == final[tier]["accuracy"]
        assert by[(tier, own)]["per_family"] == final[tier]["per_family"]
    # smoe's tiers share one global model: at the same top-k they are the same model.
    assert by[("low", 8)]["per_family"] == by[("high", 8)]["per_family"]
    assert all(r["mode"] == "choice" and r["format_failures"] == 0.0 for r in rows)
    assert "accuracy per family" in out and "samekind" in out and "high k=2" in out


def test_eval_generate_mode_end_to_end(finished_run, tmp_path):
    for name in ("g1.json", "g2.json"):
        assert main(["eval", str(finished_run), "--mode", "generate", "--top-k", "2", "--json", str(tmp_path / name)]) == 0
    rows = json.loads((tmp_path / "g1.json").read_text())
    assert rows == json.loads((tmp_path / "g2.json").read_text())  # same checkpoint, same bits
    assert [(r["tier"], r["top_k"], r["mode"]) for r in rows] == [("low", 2, "generate"), ("high", 2, "generate")]
    for r in rows:
        assert r["loss"] is None
        assert 0.0 <= r["format_failures"] <= 1.0 - r["accuracy"]  # a format failure is never right
        # Every family has the same number of prompts, so the overall shares are family means.
        assert r["accuracy"] == pytest.approx(np.mean(list(r["per_family"].values())))
        assert r["format_failures"] == pytest.approx(np.mean(list(r["per_family_format_failures"].values())))


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "0"], "--top-k: must be in [1, 32] (the model's experts), got 0"),
    (["--top-k", "2", "--top-k", "33"], "got 33"),
    (["--top-k", "two"], "--top-k: expected an integer, got 'two'"),
    (["--mode", "sample"], "--mode: must be choice or generate, got 'sample'"),
])
def test_bad_eval_flags(capsys, finished_run, args, needle):
    assert main(["eval", str(finished_run), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("fedmoe: error: "), err
    assert needle in err, err
