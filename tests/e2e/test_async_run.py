"""Asynchronous runs (federation.mode=async, docs/async.md): bad input is one line and exit 2;
a run killed at a random moment resumes to bitwise the adapters of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from pipeline.cli import main

from .conftest import REPO, TINY, fedmoe

ASYNC = ["--set", "federation.mode=async", "--set", "logging.progress=false"]
FEDBUFF = [*ASYNC, "--set", "algorithm.name=fedbuff", "--set", "algorithm.options.buffer_size=2",
           "--set", "federation.concurrency=3", "--set", "tiers.0.speed=0.5"]


def _fails(capsys, argv, needle):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("fedmoe: error: "), err
    assert needle in err, err


@pytest.mark.parametrize("overrides, needle", [
    (["tiers.0.speed=0"], "tiers.0.speed: must be > 0"),
    (["tiers.1.speed=-2"], "tiers.1.speed: must be > 0"),
    (["algorithm.name=fedbuff", "algorithm.options.buffer_size=5"], "algorithm.options.buffer_size: 5 exceeds"),
    (["algorithm.name=alignfed", "algorithm.options.t_max=0"], "algorithm.options.t_max: must be > 0"),
    (["algorithm.name=alignfed", "algorithm.options.t_max=-1.5"], "algorithm.options.t_max: must be > 0"),
    (["algorithm.name=smoe"], "algorithm.name: smoe is synchronous"),
    (["algorithm.name=fedbuff", "federation.concurrency=9"], "federation.concurrency"),
    (["algorithm.name=fedbuff", "federation.mode=later"], "federation.mode: must be sync or async"),
])
def test_bad_async_input(capsys, tmp_path, overrides, needle):
    sets = [a for o in overrides for a in ("--set", o)]
    _fails(capsys, ["run", "--config", TINY, *ASYNC, *sets, "--out", tmp_path / "r"], needle)
    assert not (tmp_path / "r").exists()


def test_async_method_in_a_sync_run(capsys, tmp_path):
    _fails(capsys, ["run", "--config", TINY, "--set", "algorithm.name=alignfed", "--out", tmp_path / "r"],
           "algorithm.name: alignfed is asynchronous; set federation.mode=async")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def fedbuff_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("async-reference") / "run"
    fedmoe("run", "--config", TINY, *FEDBUFF, "--out", out)
    return out


def _adapters(run):
    return load_file(run / "final" / "adapter.safetensors")


@pytest.mark.slow
def test_reference_run_records_its_aggregations(fedbuff_reference):
    import json

    events = [json.loads(x) for x in (fedbuff_reference / "metrics.jsonl").read_text().splitlines()]
    aggs = [e for e in events if e["event"] == "aggregate"]
    assert aggs and [a["version"] for a in aggs] == list(range(1, len(aggs) + 1))
    assert all(len(a["staleness"]) == len(a["tiers"]) == len(a["seqs"]) for a in aggs)
    assert any(max(a["staleness"]) > 0 for a in aggs)  # concurrency 3 with buffers of 2: stale updates
    times = [a["virtual_time"] for a in aggs]
    assert times == sorted(times)
    assert [e["round"] for e in events if e["event"] == "block"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_killed_at_a_random_moment_resumes_bitwise(fedbuff_reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", str(TINY), *FEDBUFF,
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.0, 3.0))  # a random moment after the round-0 checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fedmoe("resume", out)
    want, got = _adapters(fedbuff_reference), _adapters(out)
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
