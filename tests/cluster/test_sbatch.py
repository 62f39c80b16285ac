"""slurm/fedmoe.sbatch and slurm/fedmoe-hetjob.sbatch under the local shims (tests/cluster/shims):
a run stopped by USR1 asks for a requeue, the "requeued" job resumes, and the final adapters
equal an uninterrupted single-process run's. No real SLURM is involved: what the shims do not
model (scheduling, srun's signal forwarding, PMIx/PMI2 wire-up, node placement) is untested."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cluster.conftest import REPO, SHIMS, TINY
from tests.conftest import set_args

pytestmark = pytest.mark.slow

OVERRIDES = ["federation.rounds=4", "tiers.0.ranks=1", "tiers.1.ranks=1"]  # 2 ranks: 2 groups of 1
CONFIG = str(TINY.relative_to(REPO))


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_", "HYDRA_"))}
    # The shims first; then this interpreter's directory, so their `python3` exists even where
    # only the venv provides one.
    env.update({"PATH": f"{SHIMS}:{Path(sys.executable).parent}:{env.get('PATH', '')}", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "SHIM_STATE_DIR": str(tmp_path / "shim-state"), "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config in one plain process, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    sets = set_args(OVERRIDES)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", CONFIG, "--out", str(out), *sets],
                   cwd=REPO, env=_env(tmp_path_factory.mktemp("ref-env")), check=True, capture_output=True,
                   timeout=300)
    return load_file(out / "final" / "adapter.safetensors")


def _latest_round(run):
    pointer = run / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _requeues(tmp_path):
    record = tmp_path / "shim-state" / "requeue"
    return record.read_text().split() if record.exists() else []


def _submit_stop_resume(tmp_path, script, job_id, sbatch_options, env_extra, reference):
    """Submit, USR1 the batch script once round 1 is checkpointed, check the requeue request, run
    the script again as the requeued job, compare its final adapters with `reference`."""
    run, log = tmp_path / "run", tmp_path / f"job-{job_id}.log"
    sets = set_args(OVERRIDES)
    cmd = ["sbatch", *sbatch_options, f"--output={tmp_path}/job-%j.log", str(script), CONFIG, str(run), *sets]
    env = _env(tmp_path, SHIM_JOB_ID=job_id, **env_extra)
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)  # becomes the script
    start = time.time()
    while job.poll() is None and _latest_round(run) < 1 and time.time() - start < 300:
        time.sleep(0.05)
    assert job.poll() is None, log.read_text() if log.exists() else "no job log"
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does before the time limit
    job.communicate(timeout=300)
    text = log.read_text()
    assert job.returncode == 0, text
    assert _requeues(tmp_path) == [job_id], text
    assert f"requeueing job {job_id}" in text and "got SIGUSR1" in text
    assert not (run / "final").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run" and events[-1]["status"] == "stopped"

    # The requeued job: same id, SLURM_RESTART_COUNT=1, same command line.
    again = subprocess.run(cmd, cwd=REPO, env={**env, "SHIM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=300)
    text = log.read_text()
    assert again.returncode == 0, text
    assert "resuming" in text and f"finished: {run}/final/adapter.safetensors" in text, text
    assert _requeues(tmp_path) == [job_id]  # finished: no second requeue
    got = load_file(run / "final" / "adapter.safetensors")
    assert got.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(got[key], reference[key], rtol=0, atol=1e-6), key
    logs = run / "logs"
    for rank in (0, 1):
        assert (logs / f"{job_id}-rank{rank}.log").is_file(), sorted(p.name for p in logs.iterdir())
    assert (logs / f"{job_id}-rank0.log").stat().st_size > 0
    return run, cmd, env, text


def test_sbatch_stop_requeue_resume_matches_single_process(tmp_path, reference):
    run, cmd, env, text = _submit_stop_resume(
        tmp_path, REPO / "slurm" / "fedmoe.sbatch", "4242",
        ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=2"], {}, reference)
    assert "srun --mpi=pmix: one MPI world of 2 rank(s)" in text  # the shim lists pmix
    # A third start of the same job (say, a requeue that raced the end) does nothing.
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "is finished" in (tmp_path / "job-4242.log").read_text()
    assert _requeues(tmp_path) == ["4242"]


def hetjob_for_two_tiers(tmp_path) -> Path:
    """slurm/fedmoe-hetjob.sbatch with its four components (the OLMoE configs' tiers) replaced by
    the tiny config's two tiers of one rank each; the rest of the script is unchanged."""
    original = (REPO / "slurm" / "fedmoe-hetjob.sbatch").read_text()
    assert original.count("#SBATCH hetjob") == 3
    lines = [line for line in original.splitlines()
             if not re.match(r"#SBATCH (--nodes=|hetjob)|# component ", line)]
    at = lines.index("set -euo pipefail")
    lines[at:at] = ["#SBATCH --ntasks=1", "#SBATCH hetjob", "#SBATCH --ntasks=1"]
    copy = tmp_path / "fedmoe-hetjob.sbatch"
    copy.write_text("\n".join(lines) + "\n")
    return copy


def test_hetjob_stop_requeue_resume_matches_single_process(tmp_path, reference):
    _, _, _, text = _submit_stop_resume(tmp_path, hetjob_for_two_tiers(tmp_path), "5151", [],
                                        {"SHIM_MPI_LIST": "none pmi2"}, reference)
    assert "het job: 2 component(s), 2 task(s) in one MPI world (srun --het-group=0,1)" in text
    assert "srun --mpi=pmi2: one MPI world of 2 rank(s)" in text  # no pmix listed: pmi2


def test_launch_mpirun_stop_and_rerun_resumes(tmp_path, reference):
    """launch/mpirun.sh: SIGUSR1 to the script (now mpiexec) stops the ranks with a checkpoint;
    the same command resumes and ends with the single-process adapters."""
    run = tmp_path / "run"
    sets = set_args(OVERRIDES)
    cmd = [str(REPO / "launch" / "mpirun.sh"), "2", CONFIG, str(run), *sets]
    env = _env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while proc.poll() is None and _latest_round(run) < 1 and time.time() - start < 300:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not (run / "final").exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launch/mpirun.sh: resuming" in again.stderr
    got = load_file(run / "final" / "adapter.safetensors")
    assert got.keys() == reference.keys()
    assert all(torch.allclose(got[k], reference[k], rtol=0, atol=1e-6) for k in reference)
