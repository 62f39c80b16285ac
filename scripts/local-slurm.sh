#!/usr/bin/env bash
# A private SLURM cluster on this machine, to try slurm/ and for the real-SLURM tests
# (tests/cluster/test_real_slurm.py). It installs nothing: munged, slurmctld, slurmd and the
# client commands must be on PATH (Debian/Ubuntu, as root:
# apt-get install --no-install-recommends slurmctld slurmd slurm-client munge).
#
#   scripts/local-slurm.sh up       # prints: export SLURM_CONF=<dir>/slurm.conf
#   scripts/local-slurm.sh status
#   scripts/local-slurm.sh down
#
# Everything lives in one directory, LOCAL_SLURM_DIR (default ${TMPDIR:-/tmp}/fedmoe-slurm-UID):
# slurm.conf, a fresh munge key and socket, state, spool, logs and pid files. Nothing under /etc
# or /run is read or written, so a site's SLURM or munge is left alone. `down` cancels the jobs,
# then stops exactly the daemons named in the pid files.
#
# LOCAL_SLURM_NODES nodes (default 2, node1..nodeN), one slurmd each, all on this machine, each
# with LOCAL_SLURM_CPUS CPUs (default: all of the machine's, so two busy nodes oversubscribe it;
# more than it has is allowed) and LOCAL_SLURM_GPUS GPUs (default 8)
# that exist only as a count (their device files are /dev/null): jobs asking for
# --gpus-per-node run, and CPU-only code ignores them. Several nodes let multi-node jobs,
# --distribution=arbitrary and heterogeneous jobs (one node per component) run for real.
# A requeued job waits cred_expire (5 s, SLURM's minimum) instead of the default 120 s.
# Ports: LOCAL_SLURM_PORT for slurmctld and the next N for the slurmds (default: free ones).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/fedmoe-slurm-$(id -u)}
CONF=$DIR/slurm.conf
MARK=$DIR/.fedmoe-local-slurm

say() { printf 'local-slurm: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
bad() { say "$*"; exit 2; }

usage() {
    echo "usage: scripts/local-slurm.sh up|down|status  (LOCAL_SLURM_DIR=$DIR)" >&2
    exit 2
}

# The pid in run/NAME.pid when that process is still COMM (a pid can be reused), else nothing.
live_pid() {
    local name=$1 comm=$2 pid
    pid=$(cat "$DIR/run/$name.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    # An exited daemon whose parent has not reaped it yet is not running.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

# "NAME COMM" for every daemon of this cluster, in the order `down` stops them.
daemons() {
    local f
    for f in "$DIR"/run/slurmd-*.pid; do
        [[ -e $f ]] || continue
        f=${f##*/}
        echo "${f%.pid} slurmd"
    done
    echo "slurmctld slurmctld"
    echo "munged munged"
}

missing_commands() {
    local cmd missing=()
    for cmd in munged slurmctld slurmd sbatch srun scontrol squeue scancel sinfo; do
        command -v "$cmd" > /dev/null || missing+=("$cmd")
    done
    echo "${missing[*]}"
}

port_free() {
    ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The first of N+1 consecutive free ports.
pick_port() {
    local count=$1 try port i ok
    if [[ -n ${LOCAL_SLURM_PORT:-} ]]; then
        echo "$LOCAL_SLURM_PORT"
        return
    fi
    for (( try = 0; try < 50; try++ )); do
        port=$(( 20000 + RANDOM % 20000 )) ok=1
        for (( i = 0; i <= count; i++ )); do port_free $(( port + i )) || { ok=0; break; }; done
        if (( ok )); then echo "$port"; return; fi
    done
    die "no $(( count + 1 )) free consecutive ports found between 20000 and 40000: set LOCAL_SLURM_PORT"
}

write_config() {
    local host=$1 port=$2 nodes=$3 cpus=$4 gpus=$5 socket=$6 user names ports gres="" i overrides=""
    user=$(id -un)
    if (( nodes == 1 )); then
        names=node1 ports=$(( port + 1 ))
    else
        names="node[1-$nodes]" ports="[$(( port + 1 ))-$(( port + nodes ))]"
    fi
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/gpu"
    chmod 700 "$DIR/munge"
    # A key of our own: only this munged authenticates this cluster's messages.
    (umask 077 && head -c 1024 /dev/urandom > "$DIR/munge/munge.key")
    # More CPUs than the machine has: slurmd would mark its node invalid unless told to believe
    # slurm.conf.
    (( cpus <= $(nproc) )) || overrides="SlurmdParameters=config_overrides"
    : > "$DIR/plugstack.conf"  # not /etc/slurm/plugstack.conf: no site SPANK plugins
    # GPUs by count only: slurmd drops a GPU without a device file, so each one is /dev/null.
    : > "$DIR/gres.conf"
    if (( gpus > 0 )); then
        gres=" Gres=gpu:$gpus"
        for (( i = 0; i < gpus; i++ )); do ln -sfn /dev/null "$DIR/gpu/$i"; done
        echo "NodeName=$names Name=gpu File=$DIR/gpu/[0-$(( gpus - 1 ))]" > "$DIR/gres.conf"
    fi
    cat > "$CONF" <<EOF
# scripts/local-slurm.sh: a private cluster on $host, written $(date '+%F %T')
ClusterName=fedmoe-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# backfill: SLURM schedules heterogeneous jobs only with it. Short intervals: a pending or
# requeued job starts within a second or two, not at the next 30-60 s pass.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,bf_hetjob_immediate,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
# Job ids that an earlier cluster did not use: a job's log is appended to (--open-mode=append),
# and with ids restarting at 1 MPI_Init once failed in MPICH's shared-memory bootstrap (killed
# ranks leave its files in /dev/shm).
FirstJobId=$(( $(date +%s) % 60000000 + 1 ))
ReturnToService=2
KillWait=5
# Finished jobs stay visible to scontrol for an hour (default 300 s).
MinJobAge=3600
GresTypes=gpu
$overrides
NodeName=$names NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=$cpus$gres State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local nodes=$1 states="" i
    for (( i = 0; i < 150; i++ )); do
        states=$(sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        [[ $states == "$nodes idle" ]] && return 0
        sleep 0.2
    done
    say "the nodes did not all become idle in 30 s (${states:-no answer from slurmctld}); the logs' last lines:"
    tail -q -n 3 "$DIR"/log/*.log >&2 2>/dev/null || true
    return 1
}

cmd_up() {
    local missing host port nodes cpus gpus i
    # Bad input first (one line, exit 2), then what this machine lacks (exit 1).
    nodes=${LOCAL_SLURM_NODES:-2}
    gpus=${LOCAL_SLURM_GPUS:-8}
    cpus=${LOCAL_SLURM_CPUS:-$(nproc)}
    [[ $nodes =~ ^[1-9][0-9]?$ ]] || bad "LOCAL_SLURM_NODES=$nodes: not a node count (1-99)"
    [[ $gpus =~ ^[0-9]+$ ]] || bad "LOCAL_SLURM_GPUS=$gpus: not a GPU count"
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || bad "LOCAL_SLURM_CPUS=$cpus: not a CPU count"
    if [[ -n ${LOCAL_SLURM_PORT:-} && ! ${LOCAL_SLURM_PORT} =~ ^[1-9][0-9]{0,4}$ ]]; then
        bad "LOCAL_SLURM_PORT=$LOCAL_SLURM_PORT: not a port number"
    fi
    if [[ -e $DIR && ! -e $MARK && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
        bad "$DIR exists and was not made by this script: set LOCAL_SLURM_DIR to a new directory"
    fi
    missing=$(missing_commands)
    if [[ -n $missing ]]; then
        if [[ -x /usr/sbin/slurmctld && :$PATH: != *:/usr/sbin:* ]]; then
            die "not on PATH: $missing (the daemons are in /usr/sbin: PATH=\$PATH:/usr/sbin)"
        fi
        die "not on PATH: $missing (as root: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)"
    fi
    if live_pid slurmctld slurmctld > /dev/null; then
        say "already up in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    host=$(hostname -s)
    port=$(pick_port "$nodes")
    mkdir -p "$DIR"
    touch "$MARK"
    # munged wants every directory above its socket open to all (a pytest tmp dir is not): the
    # socket gets a directory of its own, which `down` removes.
    local sockets
    sockets=$(mktemp -d "${TMPDIR:-/tmp}/fedmoe-munge-XXXXXX")
    chmod 755 "$sockets"
    mkdir -p "$DIR/run"
    echo "$sockets" > "$DIR/run/munge-socket-dir"
    write_config "$host" "$port" "$nodes" "$cpus" "$gpus" "$sockets/munge.socket"
    export SLURM_CONF=$CONF

    munged --socket="$sockets/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start: see $DIR/log/munged.log"
    # -c: a clean start, whatever an earlier cluster in this directory left.
    slurmctld -c -f "$CONF" || { cmd_down; die "slurmctld did not start: see $DIR/log/slurmctld.log"; }
    for (( i = 1; i <= nodes; i++ )); do
        slurmd -f "$CONF" -N "node$i" || { cmd_down; die "slurmd for node$i did not start: see $DIR/log/slurmd-node$i.log"; }
    done
    wait_idle "$nodes" || { cmd_down; exit 1; }
    say "up: $nodes node(s) of $cpus CPU(s) and $gpus GPU(s) (by count) on $host, slurmctld port $port, logs in $DIR/log"
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    local name comm pid i jobs
    if live_pid slurmctld slurmctld > /dev/null; then
        export SLURM_CONF=$CONF
        jobs=$(squeue -h -o %i 2>/dev/null | sed 's/+.*//' | sort -u || true)
        if [[ -n $jobs ]]; then
            say "cancelling job(s): ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086  # one word per job id
            scancel $jobs 2>/dev/null || true
            for (( i = 0; i < 100; i++ )); do
                [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    while read -r name comm; do
        pid=$(live_pid "$name" "$comm") || continue
        kill -TERM "$pid" 2>/dev/null || true
        for (( i = 0; i < 100; i++ )); do
            live_pid "$name" "$comm" > /dev/null || break
            sleep 0.1
        done
        if live_pid "$name" "$comm" > /dev/null; then
            say "$name (pid $pid) still running after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done < <(daemons)
    local sockets
    sockets=$(cat "$DIR/run/munge-socket-dir" 2>/dev/null || true)
    if [[ $sockets == */fedmoe-munge-* && -d $sockets ]] && ! live_pid munged munged > /dev/null; then
        rm -f "$sockets/munge.socket" "$sockets/munge.socket.lock"
        rmdir "$sockets" 2>/dev/null || true
        rm -f "$DIR/run/munge-socket-dir"
    fi
    say "down ($DIR)"
}

cmd_status() {
    local name comm pid rc=0
    while read -r name comm; do
        if pid=$(live_pid "$name" "$comm"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
            rc=3
        fi
    done < <(daemons)
    if (( rc == 0 )); then
        SLURM_CONF=$CONF sinfo -h -N -o "%N: %T, %c CPU(s), %G" || rc=3
        echo "export SLURM_CONF=$CONF"
    fi
    return "$rc"
}

(( $# == 1 )) || usage
case $1 in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
