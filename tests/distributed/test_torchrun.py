"""torchrun-style launchers (torchrun, `accelerate launch`): the client groups form over gloo
(federation/torchcomm.TorchComm) and the run ends where the MPI run of the same layout ends.

4 ranks = 2 groups of 2 data-parallel ranks under ZeRO 2, as in test_equivalence. Each group's
DeepSpeed world is gloo under either launcher and the cross-group sum has two summands, so the
final adapters came out bitwise equal when measured; the bound asserted is the equivalence
tests' 1e-5 on the whole adapter. A run checkpointed by 4 MPI ranks resumes in one process.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.engine.client import free_port
from pipeline.errors import UserError

from tests.conftest import GROUPS_OF_TWO, relative_difference, run_here, set_args

from .conftest import ENV, REPO, SCRIPTS, TINY

BIN = Path(sys.executable).parent


def launch(launcher: str, n: int, *args, timeout=300, check=True) -> subprocess.CompletedProcess:
    """ARGS (a script, or `-m module ...`) on N CPU processes under `launcher`."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--master_port", str(free_port()), *map(str, args)]
    elif launcher == "accelerate":  # the shipped script and config (DEEPSPEED type, standard launcher)
        if not (BIN / "accelerate").exists():
            pytest.skip("accelerate is not installed")
        assert args[0] == "-m" and args[1] == "pipeline.cli"
        cmd = ["bash", str(REPO / "launch" / "accelerate.sh"), "--num_processes", str(n),
               "--main_process_port", str(free_port()), "--", *map(str, args[2:])]
    else:
        raise ValueError(launcher)
    env = {**ENV, "ACCELERATE": str(BIN / "accelerate"), "PATH": f"{BIN}:{ENV.get('PATH', '')}"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "PMI_RANK"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if "tensorboard" not in p.parts)


def _record(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["event"], e.get("round"), e.get("client"), e.get("tier")) for e in events]


@pytest.fixture(scope="module")
def mpi4(mpi_groups_of_two):
    return mpi_groups_of_two


@pytest.mark.slow
def test_torchcomm_split_allreduce_bcast_over_three_processes():
    proc = launch("torchrun", 3, SCRIPTS / "torchcomm_ops.py", timeout=120)
    assert proc.stdout.count(": ok") == 3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["arrive", "guard"])
def test_watchdog_over_torchcomm_ends_the_job_when_a_rank_never_arrives(mode):
    start = time.monotonic()
    proc = launch("torchrun", 2, SCRIPTS / "watchdog.py", mode, "torch", timeout=100, check=False)
    assert proc.returncode != 0
    assert "waited more than 1 s (federation.collective_timeout)" in proc.stderr
    assert "did not fire" not in proc.stdout
    assert time.monotonic() - start < 60  # rank 1 would sleep 120 s


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate"])  # accelerate starts torch.distributed.run itself
def test_four_cpu_processes_under_a_torchrun_style_launcher_end_like_mpiexec(launcher, mpi4, tmp_path):
    out = tmp_path / launcher
    proc = launch(launcher, 4, "-m", "pipeline.cli", "run", "--config", TINY, "--out", out,
                  *set_args(GROUPS_OF_TWO))
    assert proc.stdout.count("done: adapters in") == 1  # only world rank 0 reports
    got = load_file(out / "final" / "adapter.safetensors")
    want = load_file(mpi4 / "final" / "adapter.safetensors")
    assert relative_difference(got, want) <= 1e-5
    assert _record(out) == _record(mpi4) and _files(out) == _files(mpi4)


@pytest.mark.slow
def test_a_run_of_four_mpi_ranks_resumes_in_one_process(mpi4, tmp_path):
    """Checkpoints hold the global strategy state only: layout-independent. The 4-rank run is
    rolled back to its round-2 checkpoint (as if killed during round 3) and one process
    redoes round 3; data-parallel float reassociation is the only difference."""
    run = tmp_path / "run"
    shutil.copytree(mpi4, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "round-000003")
    (run / "checkpoints" / "latest").write_text("round-000002\n")
    run_here("resume", run)
    got = load_file(run / "final" / "adapter.safetensors")
    want = load_file(mpi4 / "final" / "adapter.safetensors")
    assert relative_difference(got, want) <= 1e-5
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2, 3]
    assert [e["status"] for e in events if e["event"] == "run"] == ["started", "resumed", "finished"]


def test_an_accelerate_zero_stage_that_differs_from_the_run_config_is_refused(monkeypatch):
    from pipeline.config import load_config
    from pipeline.federation.topology import _check_accelerate

    cfg = load_config(TINY)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(cfg.deepspeed.zero_stage))
    _check_accelerate(cfg)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(cfg.deepspeed.zero_stage + 1))
    with pytest.raises(UserError, match="fedmoe configures DeepSpeed from the run config only"):
        _check_accelerate(cfg)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    _check_accelerate(cfg)  # no DeepSpeed plugin: nothing to compare


def test_the_launcher_decides_the_world(monkeypatch):
    from pipeline.federation import topology, torchcomm

    monkeypatch.setattr(torchcomm.TorchComm, "world", classmethod(lambda cls: "torch world"))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                *topology._LAUNCHER_VARS):
        monkeypatch.delenv(var, raising=False)
    assert topology.mpi_world() is None  # no launcher: the single-process path
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for var, value in torchrun.items():
        monkeypatch.setenv(var, value)
    assert topology.mpi_world() == "torch world"
    # torch.distributed.run's workers under `srun`: PMI variables inherited, still not MPI ranks
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert topology.mpi_world() == "torch world"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert topology.mpi_world() is None  # one process: the single-process path
