"""Client failures in different groups: dropped, logged once by rank 0, the round completes."""
import pytest

from .conftest import SCRIPTS, TINY, mpiexec

pytestmark = pytest.mark.slow


def test_failed_clients_in_two_groups_are_dropped_and_the_round_completes(tmp_path):
    proc = mpiexec(2, SCRIPTS / "fault_round.py", TINY, tmp_path / "run", timeout=180)
    assert proc.stdout.count(": ok") == 2
