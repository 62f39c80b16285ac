#!/usr/bin/env bash
# fedmoe on one machine under MPI, no scheduler: N ranks of `python -m mpi4py -m pipeline.cli`.
#
#   launch/mpirun.sh N CONFIG RUN_DIR [--set KEY=VALUE ...]
#
# Starts `fedmoe run --config CONFIG --out RUN_DIR [--set ...]`, or `fedmoe resume RUN_DIR` when
# RUN_DIR already holds a run (checkpoints/latest, or config.yaml + metrics.jsonl; the extra
# arguments are then ignored: the run's config.yaml rules). `fedmoe plan --config CONFIG
# --ranks N` shows the client groups first. The launcher replaces this script, so SIGUSR1 or
# SIGTERM sent to it reaches MPICH's mpiexec (Hydra), which passes it to every rank: they
# checkpoint the completed rounds and exit 0; the same command then resumes.
#
# PYTHON: the interpreter (default: the repository's .venv/bin/python); MPIEXEC: the launcher
# (default: the mpiexec beside PYTHON, i.e. the venv's `mpich` wheel, which mpi4py is built
# for); MPIEXEC_ARGS: extra launcher options, split on spaces, e.g. several machines with
# Hydra: MPIEXEC_ARGS="-f launch/hostfile.mpich" (one `host:slots` per line; see
# launch/hostfile.example). Ranks pick GPUs by their rank on the node.
set -euo pipefail

if (( $# < 3 )) || ! [[ $1 =~ ^[0-9]+$ ]]; then
    echo "usage: launch/mpirun.sh N CONFIG RUN_DIR [--set KEY=VALUE ...]" >&2
    exit 2
fi
ranks=$1 config=$2 run_dir=$3
shift 3
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || { echo "launch/mpirun.sh: no interpreter at $python (make venv, or set PYTHON)" >&2; exit 2; }
mpiexec=${MPIEXEC:-$(dirname "$python")/mpiexec}
[[ -x $mpiexec ]] || mpiexec=$(command -v mpiexec) || { echo "launch/mpirun.sh: no mpiexec (set MPIEXEC)" >&2; exit 2; }
extra=()
if [[ -n ${MPIEXEC_ARGS:-} ]]; then read -r -a extra <<< "$MPIEXEC_ARGS"; fi

if [[ -f $run_dir/checkpoints/latest || ( -f $run_dir/config.yaml && -f $run_dir/metrics.jsonl ) ]]; then
    cmd=(resume "$run_dir")
    echo "launch/mpirun.sh: resuming $run_dir ($(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo "no checkpoint yet"))" >&2
else
    cmd=(run --config "$config" --out "$run_dir" "$@")
fi
export PYTHONUNBUFFERED=1
echo "launch/mpirun.sh: $mpiexec ${extra[*]} -n $ranks $python -m mpi4py -m pipeline.cli ${cmd[*]}" >&2
exec "$mpiexec" "${extra[@]}" -n "$ranks" "$python" -m mpi4py -m pipeline.cli "${cmd[@]}"
