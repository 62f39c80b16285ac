"""`fedmoe compare --mode generate`: the finished runs' final checkpoints scored again by greedy
generation, each as `fedmoe eval RUN --mode generate --json` (run in this process here), and
the table built from those scores."""
import json
import shutil

from pipeline.eval import compare, compare_rescore
from pipeline.eval.compare_runs import Job

from .conftest import REPO


def test_rescoring_in_generate_mode_tabulates_the_eval_commands_scores(finished_run, tmp_path, cli, monkeypatch):
    out = tmp_path / "cmp"
    for seed in (0, 1):  # two seeds of one method: the same finished run twice
        shutil.copytree(finished_run, out / f"smoe-seed{seed}", ignore=shutil.ignore_patterns("tensorboard"))
    spec = compare.Spec(finished_run / "config.yaml", [0, 1], [], {"smoe": []}, None)
    runs = {("smoe", s): out / f"smoe-seed{s}" for s in (0, 1)}
    launched: list[Job] = []

    def launch(jobs, out_, parallel, command, finished=None, what="runs"):
        for job in jobs:  # as compare_runs.launch would, but in this process
            launched.append(job)
            cli(*job.command)
            assert finished(job)

    monkeypatch.setattr(compare_rescore, "launch", launch)
    scores = compare_rescore.rescore(runs, "generate", out, 1, "fedmoe compare x --mode generate")
    assert [j.command[:3] for j in launched] == [["eval", str(runs[("smoe", s)]), "--mode"] for s in (0, 1)]
    assert [j.log_name for j in launched] == ["smoe-seed0-eval-generate.log", "smoe-seed1-eval-generate.log"]
    rows = json.loads((runs[("smoe", 0)] / "eval-generate.json").read_text())
    assert {r["mode"] for r in rows} == {"generate"} and {r["round"] for r in rows} == {3}
    assert scores[("smoe", 0)] == {r["tier"]: r for r in rows}

    result = compare.summarise(spec, runs, scores)
    assert result["smoe"]["finals"]["low"] == [scores[("smoe", s)]["low"]["accuracy"] for s in (0, 1)]
    assert result["smoe"]["format_failures"]["high"] == scores[("smoe", 0)]["high"]["format_failures"]
    text = compare.markdown(spec, result, "fedmoe compare x --mode generate", "generate")
    assert "scored in `generate` mode" in text and "Format failures" in text and "![" not in text

    # A second rescoring reuses the files; one of another round is scored again.
    launched.clear()
    stale = [{**r, "round": 2} for r in rows]
    (runs[("smoe", 1)] / "eval-generate.json").write_text(json.dumps(stale))
    compare_rescore.rescore(runs, "generate", out, 1, "fedmoe compare x --mode generate")
    assert [j.seed for j in launched] == [1]


def test_a_bad_mode_is_one_line_and_exit_2(tmp_path, cli):
    code, _, err = cli("compare", REPO / "configs" / "compare" / "smoke.yaml", "--out", tmp_path / "o", "--mode", "greedy",
                       check=False)
    assert code == 2 and err.strip() == "fedmoe: error: --mode: must be choice or generate, got 'greedy'"
    assert not (tmp_path / "o").exists()
