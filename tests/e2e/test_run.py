"""A whole run through the CLI: outputs, resume after SIGKILL, evaluation, merged export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_here

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow


def test_run_directory_contract(finished_run):
    run = finished_run
    for path in ["config.yaml", "metrics.jsonl", "report.md", "plots/accuracy.png",
                 "plots/expert_load.png", "final/adapter.safetensors", "final/model/config.json",
                 "checkpoints/latest"]:
        assert (run / path).exists(), path
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert sorted({e["round"] for e in evals}) == [0, 1, 2, 3]  # base model first, then every round
    assert {(e["tier"], e["top_k"]) for e in evals} == {("low", 2), ("high", 8)}
    for e in evals:
        assert 0.0 <= e["accuracy"] <= 1.0
    rounds = [e for e in events if e["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    clients = [e for e in events if e["event"] == "client"]
    assert len(clients) == 6 and all(c["steps"] == 3 for c in clients)
    low = [c for c in clients if c["tier"] == "low"]
    assert all(c["top_k"] == 2 for c in low)
    assert (run / "checkpoints" / "latest").read_text().strip() == "round-000003"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["federation"]["rounds"] == 3


def test_run_records_where_its_time_and_memory_went(finished_run):
    events = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "run")
    assert start["load_seconds"] > 0
    phases: dict[int, dict[str, float]] = {}
    for e in (e for e in events if e["event"] == "timing"):
        for phase, seconds in e.items():
            if phase not in ("event", "round", "time"):
                assert seconds >= 0, (e["round"], phase)
                phases.setdefault(e["round"], {})[phase] = phases.get(e["round"], {}).get(phase, 0) + seconds
    assert set(phases[0]) == {"evaluate", "checkpoint"}  # the base model's round 0
    assert set(phases[1]) == set(phases[2]) == {"train", "aggregate", "evaluate", "checkpoint"}
    assert set(phases[3]) == {"train", "aggregate", "evaluate", "checkpoint", "export"}
    for r in (e for e in events if e["event"] == "round"):  # both inside the round's own seconds
        assert 0 < phases[r["round"]]["train"] + phases[r["round"]]["aggregate"] <= r["seconds"]
    clients = [e for e in events if e["event"] == "client"]
    assert all(c["peak_memory_gib"] > 0 for c in clients)
    report = (finished_run / "report.md").read_text()
    assert "where the time went (world rank 0): load " in report and ", export " in report
    assert "peak memory while training a client: high " in report


def test_merged_model_loads_as_plain_hugging_face_model(finished_run):
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(finished_run / "final" / "model")
    assert type(model.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock"


def test_eval_command_reproduces_final_accuracy(finished_run, tmp_path, cli):
    cli("eval", finished_run, "--json", tmp_path / "eval.json")
    rows = json.loads((tmp_path / "eval.json").read_text())
    events = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    last = {e["tier"]: e["accuracy"] for e in events if e["event"] == "eval" and e["round"] == 3}
    assert {r["tier"]: r["accuracy"] for r in rows} == last


def _start(*args, threads=1):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _latest_round(run):
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else -1


def _kill_when(proc, run, reached_round=None, after_seconds=None, timeout=240):
    """SIGKILL once `reached_round` is checkpointed (plus a moment), or after some seconds."""
    start = time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if after_seconds is not None and time.time() - start >= after_seconds:
            break
        if reached_round is not None and _latest_round(run) >= reached_round:
            time.sleep(0.4)  # into the next round's local training
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_two_runs_in_one_process_end_as_a_fresh_process_does(finished_run, tmp_path, cli):
    """A notebook's second run: the first run's end drops its torch.distributed world and
    DeepSpeed's cached groups, so the second builds its engine afresh (it failed before); both
    end with the bits of the run made in a fresh process at the same thread count."""
    want = (finished_run / "final" / "adapter.safetensors").read_bytes()
    for name in ("first", "second"):
        cli("run", "--config", TINY, "--out", tmp_path / name)
        assert (tmp_path / name / "final" / "adapter.safetensors").read_bytes() == want, name


def test_sigkill_and_resume_at_two_threads_is_bitwise_identical(two_thread_run, tmp_path):
    """Same seed, same bits at the default thread count of a 2-core machine: a second run,
    killed at several moments and resumed, ends where the uninterrupted one does."""
    run = tmp_path / "killed"
    _kill_when(_start("run", "--config", TINY, "--out", run, threads=2), run, reached_round=1)
    # Kill again at other moments: during start-up, then after the next checkpoint.
    _kill_when(_start("resume", run, threads=2), run, after_seconds=3.0)
    _kill_when(_start("resume", run, threads=2), run, reached_round=2)
    for _ in range(5):
        if (run / "final" / "adapter.safetensors").exists():
            break
        run_here("resume", run, threads=2)
    starts = [json.loads(line) for line in (two_thread_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["threads"] for e in starts if e["event"] == "run" and e["status"] == "started"] == [2]
    want = load_file(two_thread_run / "final" / "adapter.safetensors")
    got = load_file(run / "final" / "adapter.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # The resumed run's log has each round's evaluation exactly once.
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [e["round"] for e in events if e["event"] == "eval" and e["tier"] == "low"]
    assert rounds == [0, 1, 2, 3]


def test_stop_signal_checkpoints_exits_zero_and_resumes_bitwise(finished_run, tmp_path, sig=signal.SIGUSR1):
    """What a SLURM requeue does: signal mid-run, exit 0 with the completed rounds kept, resume.
    SIGTERM takes the same path (tests/unit/test_signals.py)."""
    run = tmp_path / "stopped"
    proc = _start("run", "--config", TINY, "--out", run)
    start = time.time()
    while proc.poll() is None and _latest_round(run) < 1 and time.time() - start < 240:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert not (run / "final").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run" and events[-1]["status"] == "stopped"
    run_here("resume", run)
    want = load_file(finished_run / "final" / "adapter.safetensors")
    got = load_file(run / "final" / "adapter.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "eval" and e["tier"] == "low"] == [0, 1, 2, 3]
