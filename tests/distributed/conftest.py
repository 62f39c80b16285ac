"""Distributed tests: real MPI jobs (mpiexec from the venv's `mpich` wheel) on CPU with gloo."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
# PYTHONPATH: scripts run by path must import this checkout, not wherever `pipeline` is installed.
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(REPO)}


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def mpiexec(n: int, *args, check=True, timeout=240) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mpi4py ARGS`: an exception in one rank aborts the whole job."""
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec")
    cmd = [launcher, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc
