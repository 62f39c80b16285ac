# shellcheck shell=bash
# The body of slurm/fedmoe.sbatch and slurm/fedmoe-hetjob.sbatch, sourced from the repository
# root after `cd "$SLURM_SUBMIT_DIR"` (sbatch runs a copy of the batch script from its spool
# directory, so the scripts find this file through the submit directory, not through $0).
#
#   fedmoe_job CONFIG RUN_DIR [--set KEY=VALUE ...]
#
# 1. activates the venv (FEDMOE_VENV, default .venv);
# 2. resumes RUN_DIR when it holds a run (checkpoints/latest, or config.yaml + metrics.jsonl),
#    else starts `fedmoe run --config CONFIG --out RUN_DIR [--set ...]`;
# 3. picks the srun MPI plugin by trying it in a short step that must give the ranks one MPI
#    world (fedmoe_pick_mpi), then starts the ranks with srun in the background (bash runs a
#    trap only once a foreground child has returned); each rank writes
#    RUN_DIR/logs/<jobid>-rank<task>.log;
# 4. on SIGUSR1 (sbatch --signal=B:USR1@120) or SIGTERM, sends SIGUSR1 to the srun step: every
#    rank stops at the next client boundary, the completed rounds are checkpointed, all exit 0;
# 5. srun exit 0 and no RUN_DIR/final/adapter.safetensors: `scontrol requeue $SLURM_JOB_ID`;
#    the requeued job runs this script again and takes the resume branch. srun exit != 0:
#    no requeue (an error would repeat); the job fails with srun's status.
#
# Environment: FEDMOE_SRUN_MPI (the srun --mpi plugin; default: the first of pmix, pmi2, none
# that works), FEDMOE_TASKS_PER_NODE (ranks per node, "2,2,4": from `fedmoe plan --sbatch`
# when the nodes hold different numbers of ranks), FEDMOE_MAX_REQUEUES (default 50),
# FEDMOE_SRUN_ARGS (extra srun options, split on spaces). Set by the calling script:
# SRUN_GROUP_ARGS (an array: --ntasks=N, or --het-group=0,1,... in a het job) and FEDMOE_NTASKS
# (the world size the ranks must see).

fedmoe_say() {
    printf '[fedmoe %(%F %T)T job %s] %s\n' -1 "${SLURM_JOB_ID:-?}" "$*"
}

fedmoe_die() {
    fedmoe_say "error: $*"
    exit 2
}

# The srun MPI plugin, tested rather than guessed: with FEDMOE_SRUN_MPI only that one, else pmix,
# pmi2 and none in that order (those `srun --mpi=list` lists, all three if it lists none). The
# first under which a short step gives the ranks one MPI world of FEDMOE_NTASKS becomes
# FEDMOE_MPI. A listed plugin may still not load: Debian's SLURM lists pmix without the PMIx
# library, and srun then fails at once. Under none, MPICH's ranks are singletons (worlds of 1).
# Arguments: RUN_DIR, then srun's other arguments.
fedmoe_pick_mpi() {
    local run_dir=$1 want=${FEDMOE_NTASKS:-${SLURM_NTASKS:-0}} listed candidates=() tried=() p
    shift
    if [[ -n ${FEDMOE_SRUN_MPI:-} ]]; then
        candidates=("$FEDMOE_SRUN_MPI")
    else
        listed=$(srun --mpi=list 2>&1 || true)
        for p in pmix pmi2 none; do
            if grep -qE "^[[:space:]]+$p\$" <<< "$listed"; then candidates+=("$p"); fi
        done
        (( ${#candidates[@]} )) || candidates=(pmix pmi2 none)
    fi
    for p in "${candidates[@]}"; do
        local log="$run_dir/logs/${SLURM_JOB_ID}-mpicheck-$p.log" world rc=0 why
        if [[ $p == pmi2 && -z ${MPIR_CVAR_CH4_NETMOD:-} ]]; then
            # The `mpich` wheel's default netmod, UCX, has addresses too long for srun's pmi2
            # server: MPICH splits them over several PMI values, a line overflows the server's
            # buffer, and with ranks on two nodes MPI_Init fails or hangs now and then
            # ("mpi/pmi2: value not properly terminated"; pmodels/mpich#6924; PMI-1 hangs the
            # same way). The wheel's other netmod, OFI (libfabric), has short addresses. Only
            # mpi4py's small cross-group messages use it; other MPIs ignore the variable.
            export MPIR_CVAR_CH4_NETMOD=ofi
        fi
        # srun's own errors (a plugin that does not load) and the tasks' stderr both go to $log.
        # Rank 0 prints the world size and each rank's node.
        world=$(srun "$@" --mpi="$p" python -c 'import os; from mpi4py import MPI; c = MPI.COMM_WORLD
n = c.gather(os.environ.get("SLURMD_NODENAME", "?"))
print(c.Get_size(), *n) if c.Get_rank() == 0 else None' 2> "$log") || rc=$?
        if (( rc == 0 )) && [[ $world != *$'\n'* && ${world%% *} == "$want" ]]; then
            FEDMOE_MPI=$p
            fedmoe_say "srun --mpi=$p: one MPI world of $want rank(s), on nodes (rank order) ${world#* }${tried[*]:+ (not ${tried[*]})}${MPIR_CVAR_CH4_NETMOD:+; MPIR_CVAR_CH4_NETMOD=$MPIR_CVAR_CH4_NETMOD}"
            return 0
        fi
        if (( rc != 0 )); then
            why="srun exited $rc: $(grep -m1 -i error "$log" || tail -n1 "$log" || true)"
        else
            why="$want task(s) but MPI saw the world(s) '${world//$'\n'/; }' (size, nodes)"
        fi
        fedmoe_say "srun --mpi=$p does not work here: $why (log: $log)"
        tried+=("$p")
    done
    fedmoe_die "no srun MPI plugin of (${candidates[*]}) gives the ranks one MPI world of $want: mpi4py's MPI does not talk to this SLURM (set FEDMOE_SRUN_MPI, or build mpi4py against the site MPI); logs: $run_dir/logs/${SLURM_JOB_ID}-mpicheck-*.log"
}

# FEDMOE_TASKS_PER_NODE="2,2,4": a host list with each node repeated that many times, for
# `srun --distribution=arbitrary` (SLURM_HOSTFILE). Prints the file's path.
fedmoe_hostfile() {
    local run_dir=$1 counts hosts i j file
    IFS=, read -r -a counts <<< "$FEDMOE_TASKS_PER_NODE"
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if (( ${#hosts[@]} != ${#counts[@]} )); then
        fedmoe_die "FEDMOE_TASKS_PER_NODE=$FEDMOE_TASKS_PER_NODE names ${#counts[@]} node(s), the job has ${#hosts[@]}"
    fi
    file="$run_dir/logs/hosts-${SLURM_JOB_ID}"
    : > "$file"
    for i in "${!hosts[@]}"; do
        for (( j = 0; j < counts[i]; j++ )); do echo "${hosts[i]}" >> "$file"; done
    done
    echo "$file"
}

fedmoe_forward() {
    local sig=$1
    FEDMOE_STOPPING=1
    if [[ -n ${FEDMOE_SRUN_PID:-} ]] && kill -0 "$FEDMOE_SRUN_PID" 2>/dev/null; then
        fedmoe_say "got SIG$sig: sending SIGUSR1 to the ranks (srun pid $FEDMOE_SRUN_PID); they stop at the next client boundary and checkpoint the completed rounds"
        kill -USR1 "$FEDMOE_SRUN_PID" 2>/dev/null || true
    else
        fedmoe_say "got SIG$sig before the ranks started: not starting them"
    fi
}

fedmoe_job() {
    if (( $# < 2 )); then
        echo "usage: sbatch [options] slurm/fedmoe.sbatch CONFIG RUN_DIR [--set KEY=VALUE ...]" >&2
        exit 2
    fi
    local config=$1 run_dir=$2
    shift 2
    # First: a signal before the traps would kill this script, and the job with it, unrequeued.
    FEDMOE_STOPPING=0
    FEDMOE_SRUN_PID=
    trap 'fedmoe_forward USR1' USR1
    trap 'fedmoe_forward TERM' TERM
    [[ -f pyproject.toml && -d pipeline ]] || fedmoe_die "$PWD is not the fedmoe repository: submit from its root (or set FEDMOE_REPO)"
    local venv=${FEDMOE_VENV:-.venv}
    [[ -f $venv/bin/activate ]] || fedmoe_die "no virtual environment at $venv (run \`make venv\` on a login node, or set FEDMOE_VENV)"
    # shellcheck source=/dev/null
    source "$venv/bin/activate"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

    fedmoe_say "start: restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-?}, $(hostname), repo $PWD"
    if [[ -f $run_dir/final/adapter.safetensors ]]; then
        fedmoe_say "$run_dir is finished (final/adapter.safetensors exists): nothing to do"
        exit 0
    fi
    local cmd
    if [[ -f $run_dir/checkpoints/latest || ( -f $run_dir/config.yaml && -f $run_dir/metrics.jsonl ) ]]; then
        local latest
        latest=$(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo "none")
        cmd=(resume "$run_dir")
        fedmoe_say "resuming $run_dir from checkpoint $latest (its config.yaml rules)"
        if (( $# )); then fedmoe_say "note: resuming ignores the extra arguments: $*"; fi
    else
        [[ -f $config ]] || fedmoe_die "no config file $config"
        cmd=(run --config "$config" --out "$run_dir" "$@")
        fedmoe_say "new run: fedmoe ${cmd[*]}"
    fi
    mkdir -p "$run_dir/logs"

    local srun_args=("${SRUN_GROUP_ARGS[@]}" --kill-on-bad-exit=1)
    if [[ -n ${FEDMOE_TASKS_PER_NODE:-} ]]; then
        SLURM_HOSTFILE=$(fedmoe_hostfile "$run_dir")
        export SLURM_HOSTFILE
        srun_args+=(--distribution=arbitrary)
        fedmoe_say "ranks per node: $FEDMOE_TASKS_PER_NODE (srun --distribution=arbitrary, $SLURM_HOSTFILE)"
    fi
    if [[ -n ${FEDMOE_SRUN_ARGS:-} ]]; then
        local extra
        read -r -a extra <<< "$FEDMOE_SRUN_ARGS"
        srun_args+=("${extra[@]}")
    fi

    # One MPI world, or every rank would run alone and write the run directory.
    fedmoe_pick_mpi "$run_dir" "${srun_args[@]}"
    srun_args+=(--mpi="$FEDMOE_MPI")
    fedmoe_say "rank logs: $run_dir/logs/${SLURM_JOB_ID}-rank<task>.log"
    if (( FEDMOE_STOPPING )); then
        fedmoe_say "stopped before the run started; requeueing"
    else
        srun "${srun_args[@]}" --open-mode=append --output="$run_dir/logs/%j-rank%t.log" \
            python -m mpi4py -m pipeline.cli "${cmd[@]}" &
        FEDMOE_SRUN_PID=$!
        local rc=0
        wait "$FEDMOE_SRUN_PID" || rc=$?
        while kill -0 "$FEDMOE_SRUN_PID" 2>/dev/null; do  # a trap ended the wait, not srun
            rc=0
            wait "$FEDMOE_SRUN_PID" || rc=$?
        done
        if (( rc != 0 )); then
            fedmoe_say "srun exited $rc: not requeued (see $run_dir/logs/${SLURM_JOB_ID}-rank*.log); resubmitting the same command resumes"
            exit "$rc"
        fi
    fi
    if [[ -f $run_dir/final/adapter.safetensors ]]; then
        fedmoe_say "finished: $run_dir/final/adapter.safetensors"
        exit 0
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} most=${FEDMOE_MAX_REQUEUES:-50}
    if (( restarts >= most )); then
        fedmoe_say "not finished after $restarts requeue(s) (FEDMOE_MAX_REQUEUES=$most): giving up; resubmit to continue"
        exit 1
    fi
    fedmoe_say "stopped after checkpoint $(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo none); requeueing job $SLURM_JOB_ID: it resumes from $run_dir/checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID" || fedmoe_die "scontrol requeue $SLURM_JOB_ID failed: resubmit the same command to resume"
    exit 0
}
