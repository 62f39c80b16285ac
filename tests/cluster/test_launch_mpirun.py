"""launch/mpirun.sh (no scheduler): SIGUSR1 to the script, which is then MPICH's mpiexec, stops
the ranks with a checkpoint; the same command resumes and ends with the single-process adapters.
(The SLURM scripts run on a real cluster: test_real_slurm.py.)"""
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.cluster.conftest import REPO, TINY

pytestmark = pytest.mark.slow


def _latest_round(run):
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_launch_mpirun_stop_and_rerun_resumes(tmp_path, tiny_reference):
    run = tmp_path / "run"
    cmd = [str(REPO / "launch" / "mpirun.sh"), "2", str(TINY), str(run)]  # 2 groups of one rank: bitwise
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_", "HYDRA_"))}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO)})
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
    want = load_file(tiny_reference / "final" / "adapter.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want)
