"""Cluster-launch tests: slurm/ scripts under local shims of sbatch/srun/scontrol (tests/cluster/shims)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"
SHIMS = Path(__file__).resolve().parent / "shims"
