import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"


def fedmoe(*args, check=True, threads=1, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (one thread unless told: tests share 2 cores)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedmoe {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def finished_run(tiny_reference) -> Path:
    """One uninterrupted tiny run shared by the tests that only read its outputs."""
    return tiny_reference


@pytest.fixture(scope="session")
def two_thread_run(tmp_path_factory) -> Path:
    """The tiny run at two threads, where order-dependent float kernels would show."""
    from tests.conftest import shared_run

    return shared_run(tmp_path_factory, "two-threads", lambda out: fedmoe("run", "--config", TINY, "--out", out,
                                                                          threads=2))
