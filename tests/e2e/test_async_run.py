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

from tests.conftest import run_here, shared_run

from .conftest import REPO, TINY, fails_one_line as _fails

ASYNC = ["--set", "federation.mode=async", "--set", "logging.progress=false"]
FEDBUFF = [*ASYNC, "--set", "algorithm.name=fedbuff", "--set", "algorithm.options.buffer_size=2",
           "--set", "federation.concurrency=3", "--set", "tiers.0.speed=0.5"]


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
    return shared_run(tmp_path_factory, "async-reference",
                      lambda out: run_here("run", "--config", TINY, *FEDBUFF, "--out", out))


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
    phases = {k for e in events if e["event"] == "timing" and e["round"] >= 1 for k in e} - {"event", "round", "time"}
    assert phases == {"train", "aggregate", "evaluate", "checkpoint", "export"}


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
    run_here("resume", out)
    want, got = _adapters(fedbuff_reference), _adapters(out)
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


@pytest.mark.slow
def test_report_shows_participation_and_staleness(fedbuff_reference):
    import json

    from pipeline.eval import async_report

    text = (fedbuff_reference / "report.md").read_text()
    assert "## Asynchronous" in text and (fedbuff_reference / "plots" / "accuracy_vs_time.png").is_file()
    events = [json.loads(x) for x in (fedbuff_reference / "metrics.jsonl").read_text().splitlines()]
    trained = [e["tier"] for e in events if e["event"] == "client"]  # every update is aggregated once
    part = async_report.participation(fedbuff_reference)
    assert part["updates"] == {t: trained.count(t) for t in set(trained)}
    assert sum(part["staleness"].values()) == len(trained)
    curve = async_report.accuracy_vs_time(fedbuff_reference)["average"]
    blocks = {e["round"]: e["virtual_time"] for e in events if e["event"] == "block"}
    assert [t for t, _ in curve] == [blocks[r] for r in sorted(blocks)]


@pytest.mark.slow
def test_sync_rounds_last_as_long_as_their_slowest_client(tiny_reference):
    import json

    from pipeline.eval import async_report

    events = [json.loads(x) for x in (tiny_reference / "metrics.jsonl").read_text().splitlines()]
    durations = async_report.tier_durations(async_report.run_config(tiny_reference))
    times = async_report.sync_block_times(async_report.run_config(tiny_reference))
    for e in (e for e in events if e["event"] == "round"):
        tiers = {c["client"]: c["tier"] for c in events if c["event"] == "client" and c["round"] == e["round"]}
        assert times[e["round"]] - times[e["round"] - 1] == pytest.approx(max(durations[tiers[c]] for c in e["clients"]))


@pytest.mark.slow
def test_compare_puts_async_beside_sync(fedbuff_reference, tiny_reference, tmp_path):
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from pipeline.eval import async_report
    from pipeline.eval.compare import _save

    (tmp_path / "plots").mkdir()
    spec = SimpleNamespace(methods={"smoe": [], "fedbuff": []}, seeds=[1], reference="smoe")
    runs = {("smoe", 1): tiny_reference, ("fedbuff", 1): fedbuff_reference}
    lines = async_report.compare_section(spec, runs, tmp_path, _save, lambda w, h: Figure(figsize=(w, h)))
    rows = [x for x in lines if x.startswith("| smoe") or x.startswith("| fedbuff")]
    assert len(rows) == 2 and "| sync |" in rows[0] and "| async |" in rows[1]
    sync = async_report.accuracy_vs_time(tiny_reference)["average"]
    first = next(t for t, acc in sync if acc >= sync[-1][1])
    assert rows[0].split(" | ")[2] == f"{first:.1f} (1/1 seeds)"
    assert (tmp_path / "plots" / "accuracy_vs_virtual_time.png").is_file()


WALL = [*ASYNC, "--set", "algorithm.name=alignfed", "--set", "algorithm.options.buffer_size=2",
        "--set", "algorithm.options.t_max=0.5", "--set", "algorithm.options.align_steps=1",
        "--set", "federation.concurrency=3", "--set", "federation.rounds=2", "--set", "checkpoint.save_merged=false"]


@pytest.mark.slow
def test_wall_clock_run_replays_on_the_virtual_clock(tmp_path):
    import json

    wall, replay = tmp_path / "wall", tmp_path / "replay"
    run_here("run", "--config", TINY, *WALL, "--set", "federation.clock=wall", "--out", wall)
    run_here("run", "--config", TINY, *WALL, "--set", f"federation.replay={wall}", "--out", replay)
    a, b = _adapters(wall), _adapters(replay)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    events = [json.loads(x) for x in (wall / "metrics.jsonl").read_text().splitlines()]
    seconds = {e["seq"]: e["seconds"] for e in events if e["event"] == "client"}
    durations = {e["seq"]: e["duration"] for e in events if e["event"] == "dispatch"}
    assert durations == seconds  # the wall clock's durations are the measured training seconds
    order = [s for e in events if e["event"] == "aggregate" for s in e["seqs"]]
    assert sorted(order) == list(range(4))


def test_replay_of_a_short_record_is_refused(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "dispatch", "seq": 0, "duration": 1.0}\n')
    _fails(capsys, ["run", "--config", TINY, *ASYNC, "--set", "algorithm.name=fedbuff",
                    "--set", f"federation.replay={tmp_path}", "--out", tmp_path / "r"],
           "federation.replay: ")
    assert not (tmp_path / "r").exists()
