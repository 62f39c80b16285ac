"""Fixtures shared across test folders."""
import contextlib
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def tiny_olmoe_config() -> dict:
    """A few-kilobyte OLMoE: 2 layers, 8 experts, top-4, vocabulary 64."""
    return dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
                max_position_embeddings=64, eos_token_id=None, pad_token_id=0)


@pytest.fixture
def tiny_olmoe(tiny_olmoe_config):
    """A random-init tiny `OlmoeForCausalLM` (seed 0, non-zero routers), not patched."""
    from pipeline.model import build_model
    return build_model(tiny_olmoe_config, seed=0)


# Whole runs of tests/fixtures/tiny_run.yaml, shared by the end-to-end, distributed and launcher
# tests that compare against them (each costs tens of seconds on 2 cores). Every run uses the
# same environment (one thread, tests/*/conftest.py), so bitwise comparisons between them are meaningful.
GROUPS_OF_TWO = ("tiers.0.ranks=2", "tiers.1.ranks=2", "deepspeed.zero_stage=2")
FSL_REFERENCE = ("algorithm.name=fedsmoothlora", "federation.rounds=2", "checkpoint.keep=3")


def set_args(overrides) -> list[str]:
    """`--set KEY=VALUE` for each override, as the CLI takes them."""
    return [x for o in overrides for x in ("--set", o)]


def relative_difference(got: dict, want: dict) -> float:
    """||got - want|| / ||want|| over a whole adapter set (same keys required)."""
    import torch

    assert got.keys() == want.keys()
    diff = torch.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want))
    return float(diff / torch.sqrt(sum((want[k] ** 2).sum() for k in want)))


@contextlib.contextmanager
def as_fedmoe_process(threads: int):
    """This process at `threads` threads, as a `fedmoe` process runs; threads and stop-signal
    handlers (a run installs its own) are put back afterwards."""
    import signal

    import torch

    from pipeline.federation import signals

    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for s, handler in saved.items():
            signal.signal(s, handler)


def run_here(*args, threads: int = 1) -> None:
    """`fedmoe ARGS` in this process, with the bits a fresh `fedmoe` process at `threads`
    threads gives (tests/e2e/test_run.py: test_two_runs_in_one_process_...) and without its
    ~10 s of imports. For runs that complete; kill and signal tests need their own process."""
    from pipeline.cli import main

    with as_fedmoe_process(threads):
        code = main([str(a) for a in args])
    if code != 0:
        raise AssertionError(f"fedmoe {' '.join(map(str, args))} exited {code}")


def shared_run(tmp_path_factory, name: str, make) -> Path:
    """`make(out)` once for the whole test session, also when pytest-xdist splits it over worker
    processes: the first worker that needs run `name` makes it under a file lock, the others wait
    for it and read the same directory. Tests only read what it returns (copy it to change it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the basetemp all workers of this session share
    home = root / "shared-runs" / name
    home.mkdir(parents=True, exist_ok=True)
    out, done = home / "run", home / "done"
    with FileLock(str(home) + ".lock"):
        if not done.exists():
            if out.exists():  # a worker that failed to make it left this behind
                shutil.rmtree(out)
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """One uninterrupted single-process run of the tiny config."""
    from tests.e2e.conftest import TINY

    return shared_run(tmp_path_factory, "tiny-reference", lambda out: run_here("run", "--config", TINY, "--out", out))


@pytest.fixture(scope="session")
def fsl_reference(tmp_path_factory):
    """One uninterrupted single-process fedsmoothlora run of the tiny config, 2 rounds (round 2
    round-matches client 0 of round 1), every checkpoint kept."""
    from tests.e2e.conftest import TINY

    return shared_run(tmp_path_factory, "fsl-reference",
                      lambda out: run_here("run", "--config", TINY, "--out", out, *set_args(FSL_REFERENCE)))


@pytest.fixture(scope="session")
def mpi_groups_of_two(tmp_path_factory):
    """`mpiexec -n 4`: 2 client groups of 2 data-parallel ranks under ZeRO 2."""
    from tests.distributed.conftest import TINY, mpiexec

    def make(out):
        proc = mpiexec(4, "-m", "pipeline.cli", "run", "--config", TINY, "--out", out, *set_args(GROUPS_OF_TWO),
                       timeout=300)
        assert proc.stdout.count("done: adapters in") == 1  # only world rank 0 reports

    return shared_run(tmp_path_factory, "mpi-groups-of-two", make)


@pytest.fixture(scope="session")
def single_algorithm_run(tmp_path_factory):
    """`single_algorithm_run(name)`: the single-process run of the tiny config under algorithm
    `name`, made once for the session (the distributed tests compare against it)."""
    from tests.distributed.conftest import TINY

    def run(algorithm):
        return shared_run(tmp_path_factory, f"single-{algorithm}", lambda out: run_here(
            "run", "--config", TINY, "--out", out, *set_args([f"algorithm.name={algorithm}"])))
    return run
