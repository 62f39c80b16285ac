"""`mpiexec -n 3` async AlignFed (client groups train their clients, one collective per
aggregation, every rank fits the alignment maps) equals the single-process async run."""
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import run_here

from .conftest import TINY, mpiexec

pytestmark = pytest.mark.slow

ALIGNFED = ["--set", "federation.mode=async", "--set", "algorithm.name=alignfed", "--set", "logging.progress=false",
            "--set", "algorithm.options.buffer_size=2", "--set", "algorithm.options.align_steps=2",
            "--set", "federation.concurrency=3", "--set", "federation.rounds=2", "--set", "tiers.0.speed=0.5",
            "--set", "checkpoint.save_merged=false"]


def test_async_alignfed_over_three_ranks_equals_one_process(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    run_here("run", "--config", TINY, *ALIGNFED, "--out", one)
    mpiexec(3, "-m", "pipeline.cli", "run", "--config", TINY, *ALIGNFED, "--out", three)
    a, b = load_file(one / "final" / "adapter.safetensors"), load_file(three / "final" / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    events = [json.loads(x) for x in (three / "metrics.jsonl").read_text().splitlines()]
    aggs = [e for e in events if e["event"] == "aggregate"]
    assert any("align_loss" in g for a in aggs for g in a["strategy"]["groups"].values())  # a stale group was aligned
    assert sorted(e["seq"] for e in events if e["event"] == "client") == list(range(4))  # each update once
