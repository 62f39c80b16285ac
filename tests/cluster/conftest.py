"""Cluster-launch tests: slurm/ scripts on a real SLURM cluster started for the session
(scripts/local-slurm.sh), skipped where SLURM's packages are not installed."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"
LOCAL_SLURM = REPO / "scripts" / "local-slurm.sh"
SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class Cluster:
    directory: Path
    env: dict  # for sbatch and the other clients: SLURM_CONF, and what the jobs need

    def run(self, *cmd, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([*map(str, cmd)], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr}")
        return proc

    def sbatch(self, *args, env=None, cwd=REPO) -> str:
        """Submit; the job id. Jobs inherit this environment (sbatch's default --export=ALL)."""
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` of the job (of a het job's first component) as a dict."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout.splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, log: Path | None = None, timeout: float = 600) -> dict:
        """Poll until the job has ended; its record. `timeout` only bounds a hung job, which is then
        cancelled and reported with its state, the queue and the logs."""
        start = time.time()
        while time.time() - start < timeout:
            job = self.job(job_id)
            if job["JobState"] in FINAL_STATES:
                return job
            time.sleep(0.5)
        queue = self.run("squeue", "-o", "%i %T %r %N %M", check=False).stdout
        self.run("scancel", job_id, check=False)
        ranks = "".join(f"\n--- {p}\n{tail(p, 15)}" for p in sorted(log.parent.glob("run/logs/*.log"))) if log else ""
        raise AssertionError(f"job {job_id} still {job['JobState']} ({job.get('Reason')}) after {timeout} s\n"
                             f"{queue}\n{tail(log)}{ranks}")


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return f"(no {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _job_environment(slurm_conf: Path) -> dict:
    """This environment without a surrounding job's SLURM variables, pointing at our cluster; the
    jobs use this interpreter's venv, one thread per rank (bitwise-reproducible adapters)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    env.update({"SLURM_CONF": str(slurm_conf), "FEDMOE_VENV": sys.prefix, "OMP_NUM_THREADS": "1",
                "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    return env


def slurm_unavailable() -> str | None:
    """Why the real-SLURM tests cannot run here (one line), or None."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        return (f"no SLURM here ({' '.join(missing)} not on PATH; as root: apt-get install "
                "slurmctld slurmd slurm-client munge)")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"the SLURM jobs need a virtual environment: {sys.executable} is not in one"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """One cluster for the session: 2 nodes of 4 CPUs and 4 GPUs (by count; this machine's cores,
    shared) so that a test's job and the time-limit job fit side by side. Skips without SLURM's packages; a
    cluster that is installed but does not start is an error."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    # Not under pytest's basetemp: a concurrent session (same user) prunes old basetemps, and a
    # pruned directory would take the pid files that `down` stops the daemons by.
    directory = Path(tempfile.mkdtemp(prefix="fedmoe-slurm-test-"))
    env = {**_job_environment(directory / "slurm.conf"), "LOCAL_SLURM_DIR": str(directory),
           "LOCAL_SLURM_NODES": "2", "LOCAL_SLURM_CPUS": "4", "LOCAL_SLURM_GPUS": "4"}
    up = subprocess.run([str(LOCAL_SLURM), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, f"scripts/local-slurm.sh up failed:\n{up.stderr}"
    try:
        yield Cluster(directory, _job_environment(directory / "slurm.conf"))
    finally:
        down = subprocess.run([str(LOCAL_SLURM), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        shutil.rmtree(directory, ignore_errors=True)
