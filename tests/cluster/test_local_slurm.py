"""scripts/local-slurm.sh on bad input: one line, exit 2, nothing started (no SLURM needed).
Its cluster itself is what test_real_slurm.py runs on."""
import os
import subprocess

import pytest

from tests.cluster.conftest import LOCAL_SLURM


def _run(tmp_path, *args, **env):
    return subprocess.run([str(LOCAL_SLURM), *args], env={**os.environ, "LOCAL_SLURM_DIR": str(tmp_path / "c"), **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, env, says", [
    ([], {}, "usage: scripts/local-slurm.sh up|down|status"),
    (["start"], {}, "usage: scripts/local-slurm.sh up|down|status"),
    (["up"], {"LOCAL_SLURM_NODES": "0"}, "LOCAL_SLURM_NODES=0: not a node count (1-99)"),
    (["up"], {"LOCAL_SLURM_GPUS": "two"}, "LOCAL_SLURM_GPUS=two: not a GPU count"),
    (["up"], {"LOCAL_SLURM_CPUS": "-1"}, "LOCAL_SLURM_CPUS=-1: not a CPU count"),
    (["up"], {"LOCAL_SLURM_PORT": "6817x"}, "LOCAL_SLURM_PORT=6817x: not a port number"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, says):
    proc = _run(tmp_path, *args, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "c").exists()


def test_up_leaves_a_directory_it_did_not_make_alone(tmp_path):
    foreign = tmp_path / "c"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    proc = _run(tmp_path, "up")
    assert proc.returncode == 2 and "exists and was not made by this script" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_status_and_down_without_a_cluster(tmp_path):
    status = _run(tmp_path, "status")
    assert status.returncode == 3 and "slurmctld: not running" in status.stdout
    down = _run(tmp_path, "down")
    assert down.returncode == 0 and "down (" in down.stderr
