"""A run directory has one writer, `--overwrite` keeps the old run until the new one started,
and inputs are checked before anything is written (docs/reliability-inputs.md)."""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.federation import commands, evaluation
from pipeline.federation.rundir import LOCK_FILE, RunLock

from .conftest import REPO, TINY, fedmoe
from .test_bad_input import _fails


def _old_run(path):
    """What `--overwrite` must not lose: a finished run's files."""
    (path / "final").mkdir(parents=True)
    shutil.copy(TINY, path / "config.yaml")
    (path / "metrics.jsonl").write_text('{"event": "run", "status": "finished", "round": 3}\n')
    (path / "final" / "adapter.safetensors").write_bytes(b"years of work")
    return path


def _snapshot(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_lock(capsys, tmp_path):
    run = _old_run(tmp_path / "run")
    with open(run / LOCK_FILE, "w") as held:  # another writer, as `run`/`resume` hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        _fails(capsys, ["resume", run], "another fedmoe process is writing this run")
        _fails(capsys, ["run", "--config", TINY, "--out", run, "--overwrite"], "another fedmoe process")
    assert (run / "final" / "adapter.safetensors").read_bytes() == b"years of work"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(run / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()  # it holds the lock now
    with pytest.raises(Exception, match="another fedmoe process"):
        RunLock(run)
    holder.kill()
    holder.wait()
    RunLock(run).release()  # SIGKILL dropped it: no stale lock


@pytest.mark.parametrize("args, needle", [
    (["--set", "deepspeed.config=BAD_JSON"], "not valid JSON"),
    (["--set", "deepspeed.config=LIST_JSON"], "must hold a JSON object"),
    (["--set", "deepspeed.config=REFUSED_JSON"], "DeepSpeed refuses it"),
    (["--set", "algorithm.name=hetlora", "--set", "algorithm.options.gamma=abc"],
     "algorithm.options.gamma: expected a number, got 'abc'"),
    (["--set", "algorithm.name=hetlora", "--set", "algorithm.options.gamma=-0.5"],
     "algorithm.options.gamma: must be in (0.0, 1.0]"),
    (["--set", "algorithm.name=ubsmoe", "--set", "algorithm.options.phi_min=2"],
     "algorithm.options.phi_min: must be below phi_max"),
    (["--set", "algorithm.name=ubsmoe", "--set", "algorithm.options.n_candidates=0"],
     "algorithm.options.n_candidates: must be >= 1, got 0"),
    (["--set", "algorithm.name=smoe-lb", "--set", "algorithm.options.rate=.inf"],
     "algorithm.options.rate: must be finite"),
])
def test_bad_input_fails_before_anything_is_written(capsys, tmp_path, args, needle):
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "refused.json").write_text('{"zero_optimization": {"stage": "two"}}')
    names = {"BAD_JSON": "bad.json", "LIST_JSON": "list.json", "REFUSED_JSON": "refused.json"}
    args = [next((a.replace(k, str(tmp_path / v)) for k, v in names.items() if k in a), a) for a in args]
    old = _old_run(tmp_path / "old")
    before = _snapshot(old)
    _fails(capsys, ["run", "--config", TINY, "--out", tmp_path / "new", *args], needle)
    assert not (tmp_path / "new").exists()
    _fails(capsys, ["run", "--config", TINY, "--out", old, "--overwrite", *args], needle)
    assert _snapshot(old) == before


def test_overwrite_restores_the_old_run_when_the_start_fails(tmp_path, monkeypatch):
    old = _old_run(tmp_path / "old")
    before = _snapshot(old)

    def broken(*args, **kwargs):  # a failure after the directory was claimed, before round 0 is saved
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(evaluation, "evaluate_round", broken)
    cfg = load_config(TINY, ["federation.rounds=1"])
    with pytest.raises(RuntimeError, match="evaluation broke"):
        commands.start_run(cfg, old, overwrite=True)
    assert _snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing left beside it
    with pytest.raises(RuntimeError):
        commands.start_run(cfg, tmp_path / "fresh", overwrite=False)
    assert not (tmp_path / "fresh").exists()  # a failed fresh start leaves nothing


@pytest.mark.parametrize("where, needle", [
    ("file", "is a file, not a directory"),
    ("file/run", "is a file, not a directory"),
    pytest.param("readonly/run", "read-only or no permission",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory")),
])
def test_out_that_cannot_be_written(capsys, tmp_path, where, needle):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "readonly").mkdir(mode=0o555)
    _fails(capsys, ["run", "--config", TINY, "--out", tmp_path / where], needle)


def test_binary_config(capsys, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"seed: 1\n\xff\xfe: 2\n")
    _fails(capsys, ["run", "--config", tmp_path / "binary.yaml"], "binary.yaml: cannot be read as YAML text")


def test_eval_json_into_a_missing_directory_fails_before_evaluating(capsys, tmp_path):
    _fails(capsys, ["eval", tmp_path / "no-run", "--json", tmp_path / "missing" / "eval.json"],
           f"--json {tmp_path / 'missing' / 'eval.json'}: directory")


@pytest.mark.slow
def test_eval_json_onto_a_full_disk(capsys, finished_run):
    _fails(capsys, ["eval", finished_run, "--json", "/dev/full"], "--json /dev/full: No space left on device")


def test_unreadable_model_and_data(capsys, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(REPO / "assets" / "tiny-olmoe", model)
    with open(model / "model.safetensors", "r+b") as fh:
        fh.truncate(100_000)
    _fails(capsys, ["run", "--config", TINY, "--set", f"model.source={model}", "--out", tmp_path / "r"],
           f"model.source: cannot load the model of '{model}'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network from a test; the cache only, at once
    _fails(capsys, ["run", "--config", TINY, "--set", "data.source=commonsense", "--set",
                    "data.path=someone/no-such-dataset", "--out", tmp_path / "r"],
           "data.path: 'someone/no-such-dataset' is neither a file nor a dataset on the Hugging Face hub")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_divergence_stops_the_run_resumably(tmp_path):
    """train.lr=1e9 on the tiny config: the loss sits at ln(vocabulary), 1.7x the base model's."""
    out = _old_run(tmp_path / "run")  # replaced, since this run starts
    proc = fedmoe("run", "--config", TINY, "--out", out, "--overwrite", "--set", "train.lr=1e9",
                  "--set", "train.on_divergence=stop", "--set", "train.local_steps=1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "fedmoe: error: round 2: training diverged (tier low: loss"), proc.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diverged = [e for e in events if e["event"] == "divergence"]
    assert {(e["round"], e["tier"], e["action"], e["evals"]) for e in diverged} == {
        (2, "low", "stop", 2), (2, "high", "stop", 2)}
    assert events[-1]["event"] == "run" and events[-1]["status"] == "diverged"
    assert [e["truncated"] for e in events if e["event"] == "data"] == [0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "round-000002"  # resumable from here
    assert not (out / "final").exists()
    assert "**divergence** of tier low, rounds 2-2" in (out / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the replaced run is gone
