"""The cross-group sum over real MPI, and the watchdog that keeps a stuck rank from hanging the job."""
import time

import pytest

from .conftest import SCRIPTS, mpiexec

pytestmark = pytest.mark.slow


def test_packed_allreduce_equals_the_direct_sum_across_uneven_groups():
    proc = mpiexec(3, SCRIPTS / "collectives_sum.py", timeout=120)
    assert proc.stdout.count(": ok") == 3


@pytest.mark.parametrize("mode", ["arrive", "guard"])
def test_watchdog_aborts_the_job_when_a_rank_never_arrives(mode):
    start = time.monotonic()
    proc = mpiexec(2, SCRIPTS / "watchdog.py", mode, check=False, timeout=100)
    assert proc.returncode != 0
    assert "waited more than 1 s (federation.collective_timeout)" in proc.stderr
    assert "did not fire" not in proc.stdout
    assert time.monotonic() - start < 60  # rank 1 would sleep 120 s
