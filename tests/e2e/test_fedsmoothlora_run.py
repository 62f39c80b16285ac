"""fedsmoothlora through the CLI: the gradient-aligned init leaves the model's function alone,
and a run killed between two clients of a round resumes to the same bits, from its checkpoint's
copy of the per-client state."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FSL_REFERENCE, run_here, set_args

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow

# Kills the process right after the first client of round 2 has written its upload: round 1's
# checkpoint is the latest, and round 2's file of that client exists but no index names it.
KILLER = """
import os, signal, sys
from pipeline.algorithms.fedsmoothlora import FedSmoothLoRA
contribution = FedSmoothLoRA.contribution
def killing(self, update):
    out = contribution(self, update)
    if update.round == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
FedSmoothLoRA.contribution = killing
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _events(run, kind):
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_first_local_step_sees_the_unchanged_model(fsl_reference, tiny_reference):
    """Round 1: the base is W - s W_ga and the LoRA s W_ga, so the first step's loss is the one the
    plain model (smoe's B = 0 start, same client, batch and top-k) has; later steps differ."""
    got = {e["client"]: e["losses"] for e in _events(fsl_reference, "client") if e["round"] == 1}
    want = {e["client"]: e["losses"] for e in _events(tiny_reference, "client") if e["round"] == 1}
    assert got.keys() == want.keys()
    for client in want:
        assert got[client][0] == pytest.approx(want[client][0], rel=1e-5)
        assert got[client][1:] != pytest.approx(want[client][1:], rel=1e-3)


def test_kill_between_two_clients_and_lost_state_dir_resume_bitwise(fsl_reference, tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, "run", "--config", str(TINY), "--out", str(run),
                           *set_args(FSL_REFERENCE)], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "round-000001"
    assert len(list((run / "client_state").glob("c*-r000002.safetensors"))) == 1  # unindexed, rewritten
    shutil.rmtree(run / "client_state")  # the checkpoint's own links must carry the state
    run_here("resume", run)
    for name in ("final/base_delta.safetensors", "checkpoints/round-000002/state.safetensors"):
        want, got = load_file(fsl_reference / name), load_file(run / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    files = sorted(p.name for p in (fsl_reference / "client_state").iterdir())
    assert files == sorted(p.name for p in (run / "client_state").iterdir())
    for name in files:
        want, got = (load_file(r / "client_state" / name) for r in (fsl_reference, run))
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert [e["round"] for e in _events(run, "round")] == [1, 2]


@pytest.mark.parametrize("overrides, needle", [
    (["algorithm.options={zeta: 0.2}"], "algorithm.options.min_zeta"),
    (["model.lora.rank=40"], "model.lora.rank: the gradient-aligned init"),  # 2 r > 64, the experts' I
    (["tiers.1.ranks=8"], "algorithm.options.ga_batch_size"),  # a batch of 4 over 8 ranks
])
def test_bad_input_is_one_line_naming_the_field_and_exit_2(capsys, tmp_path, overrides, needle):
    from pipeline.cli import main

    argv = ["run", "--config", str(TINY), "--out", str(tmp_path / "r"), "--set", "algorithm.name=fedsmoothlora"]
    assert main([*argv, *set_args(overrides)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedmoe: error: ") and needle in err, err
    assert not (tmp_path / "r").exists()
