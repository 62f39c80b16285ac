"""`federation.placement: balanced` ends where `tier` ends (docs/placement.md).

Two-round runs of tiny_run.yaml with 3 clients a round (4 on groups of one rank). Round 1 is placed from the planned cost
model (nothing measured yet), so it is known in advance: balanced moves a low-tier client onto
the high tier's larger group, where tier placement keeps it on the low tier's 1-rank group.
Later rounds are placed by the learned model (wall-clock seconds), whatever it says: the result
must not depend on it. Uneven groups (`-n 3`: 1 + 2 ranks; `-n 4`: 1 + 3 ranks; `-n 3`: 2
expert-parallel ranks + 1) train a moved client data- or expert-parallel, so the bound is 1e-5 on
the whole adapter set (as test_equivalence.py and test_expert_parallel_mpi.py);
groups of one rank each (`-n 2`) end bitwise where one process ends, killed and resumed included.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.federation.placement import utilisation
from tests.conftest import relative_difference, run_here, set_args, shared_run

from .conftest import ENV, REPO, TINY, _mpiexec, mpiexec

pytestmark = pytest.mark.slow

BASE = ["federation.rounds=2", "federation.clients_per_round=3", "checkpoint.save_merged=false"]
BALANCED = BASE + ["federation.placement=balanced"]
ROUND1_TIER = [[2, 3], [0]]  # clients 0, 1 are tier high, 2, 3 low (seed 1)
ROUND1_BALANCED = [[2], [0, 3]]
# Groups of one rank each: every client a round (4), which tier placement splits 2 + 2 by tier.
EVERY = ["federation.clients_per_round=4"]


def _adapters(run):
    return load_file(run / "final" / "adapter.safetensors")


def _rounds(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "round"]


def _run(n, out, overrides):
    proc = mpiexec(n, "-m", "pipeline.cli", "run", "--config", TINY, "--out", out, *set_args(overrides),
                   timeout=400)
    assert proc.stdout.count("done: adapters in") == 1


@pytest.mark.parametrize("n, layout, gpus, moved", [
    (3, ["tiers.1.ranks=2"], [1, 2], ROUND1_BALANCED),
    (4, ["tiers.1.ranks=3"], [1, 3], ROUND1_BALANCED),
    # low: one group of 2 expert-parallel ranks (each holds half the experts), high: 1 rank
    (3, ["tiers.0.ranks=2", "tiers.0.ep_size=2"], [2, 1], [[0, 3], [2]]),
], ids=["1+2", "1+3", "ep2+1"])
def test_balanced_placement_ends_where_tier_placement_ends_on_uneven_groups(base_run, tmp_path, n, layout, gpus,
                                                                          moved):
    """Tier placement trains every client as one process does (within the data-parallel bound,
    test_equivalence.py), so the balanced run is held to the one-process run of the config; the
    tier placement of the same round is computed directly (the plan every rank computes)."""
    from pipeline.config import load_config
    from pipeline.federation.topology import plan_layout
    from pipeline.plan.memory import model_shape
    from pipeline.plan.utilisation import planned_placement

    balanced = tmp_path / "balanced"
    _run(n, balanced, BALANCED + layout)
    rounds = _rounds(balanced)
    cfg = load_config(TINY, BASE + layout)
    tier = planned_placement(cfg, plan_layout(cfg, n), model_shape(cfg.model.source), "tier")
    assert tier.assign(rounds[0]["clients"]) == ROUND1_TIER and rounds[0]["placement"]["groups"] == moved
    for r in rounds:  # measured busy time and utilisation, logged every round
        p = r["placement"]
        assert p["mode"] == "balanced" and p["gpus"] == gpus and len(p["busy_seconds"]) == 2
        assert all(b > 0 for b, g in zip(p["busy_seconds"], p["groups"]) if g)
        assert 0 < p["utilisation"] <= 1
    got, want = _adapters(balanced), _adapters(base_run)
    assert relative_difference(got, want) <= 1e-5
    assert any(not torch.equal(got[k], want[k]) for k in want)  # the 2- or 3-rank group trained data-parallel


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "placement-base", lambda out: run_here(
        "run", "--config", TINY, "--out", out, *set_args(BASE)))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return shared_run(tmp_path_factory, "placement-one", lambda out: run_here(
        "run", "--config", TINY, "--out", out, *set_args(BASE + EVERY)))


def test_balanced_on_groups_of_one_rank_is_bitwise_the_single_process_run(single_process, tmp_path):
    out = tmp_path / "balanced2"
    _run(2, out, BALANCED + EVERY)
    assert _rounds(out)[0]["placement"]["groups"] == [[0, 2], [1, 3]]  # tier placement: [[2, 3], [0, 1]]
    want, got = _adapters(single_process), _adapters(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_killed_balanced_run_resumes_bitwise_with_its_cost_model(single_process, tmp_path):
    out = tmp_path / "killed"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "pipeline.cli", "run",
           "--config", str(TINY), "--out", str(out), *set_args(BALANCED + EVERY)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if latest.exists() and latest.read_text().strip() >= "round-000001":
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, during round 2
    proc.wait()
    assert not (out / "final").exists()
    state = json.loads((out / "checkpoints" / "round-000001" / "state.json").read_text())["placement"]
    assert state["groups"] == [[1, 1, "low"], [1, 1, "high"]]
    assert any(r is not None and r > 0 for row in state["ratios"] for r in row)  # round 1 was measured
    mpiexec(2, "-m", "pipeline.cli", "resume", out, timeout=400)
    want, got = _adapters(single_process), _adapters(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    # Round 2 was placed from the checkpoint's cost model: its predictions are that model's.
    from pipeline.config import load_config
    from pipeline.federation.topology import plan_layout
    from pipeline.plan.memory import model_shape
    from pipeline.plan.utilisation import planned_placement

    cfg = load_config(TINY, BALANCED + EVERY)
    placement = planned_placement(cfg, plan_layout(cfg, 2), model_shape(cfg.model.source), "balanced")
    placement.load_state_dict(state)
    second = rounds[1]["placement"]
    assert placement.assign(rounds[1]["clients"]) == second["groups"]
    assert placement.current.predicted == second["predicted_seconds"]
    wall = max(rounds[1]["seconds"], *second["busy_seconds"])
    assert second["utilisation"] == pytest.approx(utilisation(second["busy_seconds"], [1, 1], wall))


def test_queue_on_groups_of_one_rank_trains_every_client_once_and_ends_as_one_process(single_process, tmp_path):
    """The groups pull the round's clients as they free up: whoever trains a client, the result
    is the one-process run's up to the float64 cross-group sum's association (client_queue.py)."""
    out = tmp_path / "queue"
    _run(2, out, BASE + EVERY + ["federation.placement=queue"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in _rounds(out):
        p = r["placement"]
        assert p["mode"] == "queue" and sorted(c for g in p["groups"] for c in g) == sorted(r["clients"])
        trained = {e["client"]: e["group"] for e in events if e["event"] == "client" and e["round"] == r["round"]}
        assert p["groups"] == [sorted(c for c, g in trained.items() if g == i) for i in (0, 1)]
    want, got = _adapters(single_process), _adapters(out)
    assert got.keys() == want.keys() and relative_difference(got, want) <= 1e-7
