"""slurm/ on a real SLURM: the session's cluster from scripts/local-slurm.sh (2 nodes on this
machine; tests/cluster/conftest.py), skipped where SLURM's packages are not installed.

The runs are tests/fixtures/tiny_run.yaml at 2 ranks (2 client groups of one rank, one thread
each): their final adapters are bitwise the single-process run's (`tiny_reference`). The
time-limit job is submitted first, so that its minute of waiting on SLURM's clock overlaps the
other tests; its test comes last.

No shims remain: several nodes, `--distribution=arbitrary` and heterogeneous jobs run here on
the local cluster's nodes (all on this machine, so what is not shown is MPI across machines)."""
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.cluster.conftest import REPO, TINY, slurm_unavailable, tail

if slurm_unavailable():
    pytest.skip(slurm_unavailable(), allow_module_level=True)  # one line for the whole module

# One pytest-xdist worker takes the whole module: one cluster, and the time-limit job submitted first.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("time_limit_job"),
              pytest.mark.xdist_group("slurm")]

CONFIG = str(TINY.relative_to(REPO))
ONE_NODE = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=2"]
STUB_UNITS = 40  # seconds of stub work: more than the 30 s before the first warning can come


def _same_adapters(run: Path, reference: Path):
    got = load_file(run / "final" / "adapter.safetensors")
    want = load_file(reference / "final" / "adapter.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].equal(want[key]), key


def _latest_round(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _pmix_listed_but_broken(cluster) -> bool:
    """Debian's SLURM: `srun --mpi=list` names pmix, and a pmix step cannot start."""
    listed = cluster.run("srun", "--mpi=list", check=False)
    if not re.search(r"^\s+pmix$", listed.stdout + listed.stderr, re.M):
        return False
    return cluster.run("srun", "-n1", "--mpi=pmix", "true", check=False).returncode != 0


@pytest.fixture(scope="module")
def time_limit_job(slurm_cluster, tmp_path_factory):
    """slurm/fedmoe.sbatch with a 1-minute limit and --signal=B:USR1@45, its ranks stub ranks
    (tests/cluster/stub_rank.py) through a venv whose `python` runs them for `-m mpi4py -m
    pipeline.cli` and is the real one otherwise (the MPI check)."""
    tmp = tmp_path_factory.mktemp("time-limit")
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(
        f'source {shlex.quote(sys.prefix)}/bin/activate\nPATH={shlex.quote(str(venv / "bin"))}:"$PATH"\n')
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2 $3 $4" == "-m mpi4py -m pipeline.cli" ]]; then shift 4; '
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).parent / "stub_rank.py"))} "$@"; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    log = tmp / "job.log"
    job = slurm_cluster.sbatch("--time=1", "--signal=B:USR1@45", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
                               "--gpus-per-node=1", f"--output={log}",
                               "slurm/fedmoe.sbatch", CONFIG, tmp / "run",
                               env={"FEDMOE_VENV": str(venv), "STUB_UNITS": str(STUB_UNITS)})
    return job, tmp / "run", log


def test_usr1_mid_run_requeues_and_resumes_to_the_single_process_adapters(slurm_cluster, tiny_reference, tmp_path):
    """`scancel --signal=USR1 --batch` once round 1 is checkpointed: the ranks stop, the script
    requeues the job, SLURM starts it again, it resumes and ends bitwise where one process does."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = slurm_cluster.sbatch(*ONE_NODE, f"--output={log}", "slurm/fedmoe.sbatch", CONFIG, run)
    start = time.time()
    while _latest_round(run) < 1:
        state = slurm_cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state} before round 1\n{tail(log)}"
        assert time.time() - start < 600, tail(log)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    record = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text
    assert record["Restarts"] == "1", text
    assert "got SIGUSR1: sending SIGUSR1 to the ranks" in text
    assert f"requeueing job {job}" in text and "resuming" in text, text
    assert "restart 1," in text and f"finished: {run}/final/adapter.safetensors" in text, text
    # Mid-run: rank 0 stopped after a completed round (its log is appended across starts; the
    # resumed run drops the abandoned round's events from metrics.jsonl).
    stopped = re.findall(r"stopped by a signal after round (\d+)", (run / "logs" / f"{job}-rank0.log").read_text())
    assert len(stopped) == 1 and int(stopped[0]) >= 1, stopped
    _same_adapters(run, tiny_reference)
    # The MPI plugin was tried, not guessed: where pmix is listed but cannot load, pmi2 by itself.
    assert re.search(r"srun --mpi=\w+: one MPI world of 2 rank\(s\), on nodes \(rank order\) node\d node\d", text)
    if _pmix_listed_but_broken(slurm_cluster):
        assert "srun --mpi=pmix does not work here: srun exited" in text
        assert "srun --mpi=pmi2: one MPI world of 2 rank(s)" in text and "(not pmix)" in text
    logs = sorted(p.name for p in (run / "logs").iterdir())
    assert f"{job}-rank0.log" in logs and f"{job}-rank1.log" in logs, logs


def test_a_plugin_that_gives_no_world_stops_the_job_before_the_ranks_start(slurm_cluster, tmp_path):
    """Under `--mpi=none` MPICH's ranks are singletons: the check says so and the job fails (exit 2)
    without running them, instead of two runs each writing the run directory."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = slurm_cluster.sbatch(*ONE_NODE, f"--output={log}", "slurm/fedmoe.sbatch", CONFIG, run,
                               env={"FEDMOE_SRUN_MPI": "none"})
    record = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", text
    assert "srun --mpi=none does not work here: 2 task(s) but MPI saw the world(s) '1 node1; 1 node1'" in text
    assert "error: no srun MPI plugin of (none) gives the ranks one MPI world of 2" in text
    assert not (run / "config.yaml").exists() and record["Restarts"] == "0"


def test_hetjob_runs_one_world_over_its_components_to_the_single_process_adapters(slurm_cluster, tiny_reference,
                                                                                  tmp_path):
    """slurm/fedmoe-hetjob.sbatch with its components cut to the tiny config's two tiers of one rank
    (SLURM's backfill gives each component its own node, so one per node here)."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = slurm_cluster.sbatch(f"--output={log}", hetjob_for_two_tiers(tmp_path), CONFIG, run)
    record = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text
    assert "het job: 2 component(s), 2 task(s) in one MPI world (srun --het-group=0,1)" in text
    assert re.search(r"one MPI world of 2 rank\(s\), on nodes \(rank order\) node(\d) node(?!\1)\d", text), text
    _same_adapters(run, tiny_reference)
    # %j is each component's own job id: one log per rank, none shared.
    assert len(list((run / "logs").glob("*-rank*.log"))) == 2


def hetjob_for_two_tiers(tmp_path) -> Path:
    """slurm/fedmoe-hetjob.sbatch with its four components (the OLMoE configs' tiers) replaced by
    two of one task each; the rest of the script is unchanged."""
    original = (REPO / "slurm" / "fedmoe-hetjob.sbatch").read_text()
    assert original.count("#SBATCH hetjob") == 3
    lines = [line for line in original.splitlines()
             if not re.match(r"#SBATCH (--nodes=|hetjob)|# component ", line)]
    at = lines.index("set -euo pipefail")
    lines[at:at] = ["#SBATCH --ntasks=1 --gpus-per-node=1", "#SBATCH hetjob", "#SBATCH --ntasks=1 --gpus-per-node=1"]
    copy = tmp_path / "fedmoe-hetjob.sbatch"
    copy.write_text("\n".join(lines) + "\n")
    return copy


def _plan(ranks: int, overrides: list[str]) -> str:
    """What `fedmoe plan --config CONFIG --ranks R --sbatch --gpus-per-node 2 --set ...` prints
    after its tables (the same function, in this process: the CLI starts in tens of seconds here)."""
    from pipeline.config import load_config
    from pipeline.plan.slurm import sbatch_text
    from pipeline.federation.topology import plan_layout

    cfg = load_config(TINY, overrides)
    return sbatch_text(cfg, plan_layout(cfg, ranks), CONFIG, "runs/plan", overrides, 2)


def _submit_line(plan: str) -> tuple[dict, list[str]]:
    """The `submit:` line: (environment assignments before sbatch, sbatch's arguments)."""
    words = shlex.split(next(line for line in plan.splitlines() if line.startswith("submit: "))[len("submit: "):])
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "sbatch", words
    return env, words[1:]


@pytest.mark.parametrize("ranks, overrides, nodes", [
    (2, [], "1"),  # one group per tier: 2 ranks on one node
    (4, ["tiers.0.ranks=2", "tiers.1.ranks=2"], "2"),  # 2 groups of 2: a node each
    (3, ["tiers.1.ranks=2"], "2"),  # groups of 1 and 2: 1 + 2 ranks, FEDMOE_TASKS_PER_NODE
])
def test_plan_sbatch_options_are_accepted_by_sbatch(slurm_cluster, ranks, overrides, nodes):
    """`fedmoe plan --sbatch` at 2 GPUs per node: real `sbatch --test-only` takes the printed
    command's options, and the het-job component lines when offered."""
    plan = _plan(ranks, overrides)
    env, args = _submit_line(plan)
    assert f"--nodes={nodes}" in args
    test = subprocess.run(["sbatch", "--test-only", *args], cwd=REPO, env={**slurm_cluster.env, **env},
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    components = [line[len("#SBATCH "):] for line in plan.splitlines()
                  if re.match(r"#SBATCH (hetjob|--nodes=\S+ --ntasks=)", line)]
    if ranks == 2:
        assert components.count("hetjob") == 1
    if components:
        script = "#!/bin/bash\n" + "".join(f"#SBATCH {c}\n" for c in components) + "true\n"
        het = subprocess.run(["sbatch", "--test-only"], input=script, cwd=REPO, env=slurm_cluster.env,
                             capture_output=True, text=True, timeout=60)
        assert het.returncode == 0 and "to start at" in het.stderr, het.stderr


def test_uneven_plan_places_each_group_on_one_node(slurm_cluster, tmp_path):
    """Groups of 1 and 2 ranks at 2 GPUs per node: the plan puts rank 0 on one node and ranks 1-2
    on the next. Submitted as printed (FEDMOE_TASKS_PER_NODE=1,2 in sbatch's environment), the job
    places them so (srun --distribution=arbitrary); it is cancelled once the MPI check has shown it."""
    overrides = ["tiers.1.ranks=2"]
    env, args = _submit_line(_plan(3, overrides))
    assert env == {"FEDMOE_TASKS_PER_NODE": "1,2"}
    script = next(i for i, word in enumerate(args) if word.endswith(".sbatch"))
    args[script + 2] = str(tmp_path / "run")  # the run directory, not runs/ in the repository
    log = tmp_path / "job.log"
    job = slurm_cluster.sbatch(*args[:script], f"--output={log}", *args[script:], env=env)
    start = time.time()
    while "one MPI world" not in (log.read_text() if log.exists() else ""):
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), tail(log)
        assert time.time() - start < 300, tail(log)
        time.sleep(0.2)
    slurm_cluster.run("scancel", job)
    text = log.read_text()
    assert "ranks per node: 1,2 (srun --distribution=arbitrary" in text, text
    assert "one MPI world of 3 rank(s), on nodes (rank order) node1 node2 node2" in text, text


def test_time_limit_warning_requeues_the_job_until_it_is_done(slurm_cluster, time_limit_job):
    """--time=1 --signal=B:USR1@45: SLURM warns the batch script at its first time check (every
    30 s), the stub ranks stop, the script requeues, each start gets a fresh minute, and the job
    ends COMPLETED before any limit is reached, whatever the tick's phase."""
    job, run, log = time_limit_job
    record = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["TimeLimit"] == "00:01:00", text
    restarts = int(record["Restarts"])
    assert restarts >= 1, text
    # Each start but the last was warned (a warning during the MPI check stops it before the ranks).
    assert text.count("got SIGUSR1") == restarts and f"requeueing job {job}" in text, text
    assert "DUE TO TIME LIMIT" not in text
    stub = (run / "stub.log").read_text().splitlines()
    starts = [int(line.split("restart=")[1]) for line in stub if line.startswith(("run ", "resume "))]
    assert starts == sorted(set(starts)) and starts[-1] == restarts, stub
    assert stub[-1] == f"finished at={STUB_UNITS} restart={restarts}", stub
    assert int((run / "progress").read_text()) == STUB_UNITS
