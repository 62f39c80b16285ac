"""`fedmoe compare` run management: spec checks, reuse only with the same resolved config,
--force, and SIGTERM forwarded to the child runs, which stay resumable (docs/reliability.md)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline import checkpoint
from pipeline.cli import main

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow


def _spec(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(f"base: {TINY}\n{text}\n")
    return path


@pytest.mark.parametrize("text, needle", [
    ("methods: {'../x': []}", "methods: '../x': a method name may hold"),
    ("methods: {'a/b': []}", "methods: 'a/b': a method name may hold"),
    ("methods: {.hidden: []}", "methods: '.hidden': a method name may hold"),
    ("methods: {smoe: []}\nseeds: abc", "seeds: a list of distinct integers >= 0 is required, got 'abc'"),
    ("methods: {smoe: []}\nseeds: [1.5]", "seeds: a list of distinct integers >= 0 is required, got [1.5]"),
    ("methods: {smoe: []}\nseeds: [0, 0]", "seeds: a list of distinct integers >= 0 is required, got [0, 0]"),
])
def test_a_bad_spec_is_one_line_and_writes_nothing(tmp_path, capsys, text, needle):
    out = tmp_path / "cmp" / "out"
    assert main(["compare", str(_spec(tmp_path, text)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["spec.yaml"]  # no out, no ../x


@pytest.fixture
def compare_dir(finished_run, tmp_path):
    """A compare --out holding smoe-seed1: the finished tiny run, which is what this spec makes."""
    out = tmp_path / "cmp"
    shutil.copytree(finished_run, out / "smoe-seed1")
    return out


def test_compare_reuses_a_run_only_when_its_config_is_the_same(compare_dir, tmp_path, capsys):
    run = compare_dir / "smoe-seed1"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["compare", str(_spec(tmp_path, "seeds: [1]\nmethods: {smoe: []}")), "--out", str(compare_dir)]) == 0
    assert (compare_dir / "compare.md").is_file() and "smoe" in json.loads((compare_dir / "summary.json").read_text())
    capsys.readouterr()
    other = _spec(tmp_path, "seeds: [1]\nmethods: {smoe: ['train.lr=0.001', 'eval.every=2']}", "other.yaml")
    assert main(["compare", str(other), "--out", str(compare_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"fedmoe: error: {run}: made with another config (eval.every, train.lr differ from the spec's); "
                   "pass --force to train it again, or choose another --out\n")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # reused, then refused: untouched


def test_compare_force_reruns_and_forwards_sigterm_to_its_runs(compare_dir, tmp_path):
    run = compare_dir / "smoe-seed1"
    spec = _spec(tmp_path, "seeds: [1]\nmethods: {smoe: ['train.lr=0.001']}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "compare", str(spec), "--out", str(compare_dir),
                             "--force"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    start = time.time()
    while proc.poll() is None and time.time() - start < 240:  # the rerun has begun: its config is the new one
        if "lr: 0.001" in _read(run / "config.yaml") and '"started"' in _read(run / "metrics.jsonl"):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"fedmoe: compare stopped by SIGTERM; its runs kept their completed rounds: "
        f"run `fedmoe compare {spec} --out {compare_dir} --force` again to continue")
    # The child got the signal: it stopped gracefully, checkpointed, and can be resumed.
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run" and events[-1]["status"] == "stopped"
    assert "fedmoe resume" in (compare_dir / "logs" / "smoe-seed1.log").read_text()
    latest = checkpoint.latest_checkpoint(run)
    assert latest is not None and checkpoint.damage(latest) is None and not (run / "final").exists()


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""
