"""`fedmoe compare --report-only`: the methods whose every seed has finished, on made-up runs."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_to_dict, load_config
from pipeline.errors import UserError
from pipeline.eval import compare
from pipeline.eval.compare_runs import run_overrides

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"base: {REPO / 'tests/fixtures/tiny_run.yaml'}\nseeds: [0, 1]\nreference: ubsmoe\n"
                    "contrasts: ['smoe - ubsmoe', 'smoe - hetlora']\nconvergence_reference: [ubsmoe, smoe]\n"
                    "methods: {smoe: ['algorithm.name=smoe'], ubsmoe: ['algorithm.name=ubsmoe'],"
                    " hetlora: ['algorithm.name=hetlora']}\n")
    return compare.read_spec(path)


def _run(spec, out, method, seed, finished):
    run = out / f"{method}-seed{seed}"
    (run / "final").mkdir(parents=True)
    config = config_to_dict(load_config(spec.base, run_overrides(spec, method, seed, [])))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("")
    if finished:
        (run / "final" / "adapter.safetensors").write_bytes(b"")
        (run / "report.md").write_text("")


def test_report_only_summarises_the_finished_methods_and_names_the_rest(tmp_path, monkeypatch):
    spec, out = _spec(tmp_path), tmp_path / "out"
    for method, finished in (("smoe", (True, True)), ("ubsmoe", (True, False)), ("hetlora", (True, True))):
        for seed, done in zip(spec.seeds, finished):
            _run(spec, out, method, seed, done)
    part, runs, pending = compare.finished_part(spec, out, [])
    assert list(part.methods) == ["smoe", "hetlora"] and pending == ["ubsmoe"]
    assert part.reference is None and part.contrasts == [("smoe", "hetlora")]
    assert spec.convergence_reference == ("ubsmoe", "smoe") and part.convergence_reference == ("smoe",)
    assert sorted(runs) == [("hetlora", 0), ("hetlora", 1), ("smoe", 0), ("smoe", 1)]

    accuracy = {"smoe": 0.6, "hetlora": 0.5}
    monkeypatch.setattr(compare, "load_summary", lambda run: {"chance": 0.25, "tiers": {
        "t": {"final": accuracy[run.name.split("-seed")[0]] + 0.01 * int(run.name[-1]), "base": 0.3,
              "top_k": 2, "lora_rank": 8}}})
    monkeypatch.setattr(compare, "_last_eval_stats", lambda run: {})
    monkeypatch.setattr(compare, "plot_all", lambda *args: None)
    path = compare.compare(tmp_path / "spec.yaml", out, 1, [], "fedmoe compare x --report-only", report_only=True)
    text = path.read_text()
    assert "**Partial**: not yet finished: ubsmoe." in text
    assert "| smoe - hetlora | **+10.0 ± 0.0** |" in text and "| ubsmoe |" not in text
    assert not (out / "ubsmoe-seed1" / "final" / "adapter.safetensors").exists()  # nothing trained


def test_report_only_with_nothing_finished_is_one_clear_error(tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(UserError, match="no method of the spec has finished all its seeds"):
        compare.finished_part(spec, tmp_path / "missing", [])
