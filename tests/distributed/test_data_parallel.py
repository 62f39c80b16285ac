"""One client group of 2 ranks: the data-parallel DeepSpeed step equals the whole-batch step."""
import pytest

from .conftest import SCRIPTS, mpiexec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_sharded_batches_train_like_the_whole_batch(zero_stage):
    # batch 5 over 2 ranks: uneven shards, and rows carry different numbers of answer tokens
    proc = mpiexec(2, SCRIPTS / "engine_dp.py", zero_stage, 1e-5, 5, timeout=180)
    assert proc.stdout.count("counts equal True") == 2
