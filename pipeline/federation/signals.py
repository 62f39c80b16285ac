"""SIGUSR1 or SIGTERM: stop at the next client boundary, keep the completed rounds, exit 0 (SLURM requeue).

SLURM's `--signal=B:USR1@120` warns the batch script 120 s before the time limit, and
`slurm/fedmoe.sbatch` forwards the signal to every rank. The handler only sets a flag. The
round loop (`rounds.run_round`) starts no new client once the flag is set (the client in
training finishes its local steps), and before the round's aggregation every rank agrees on
stopping: a group that stopped early must not be summed with groups that did not, so one MPI
max over the world decides, and if any rank stopped, every rank abandons the round. The last
completed round is then checkpointed (unless `checkpoint.every` already did), and the process
returns normally (exit 0). `fedmoe resume` redoes the abandoned round from its seeds, so the
final adapters equal an uninterrupted run's.

A round is abandoned as a whole, so what the 120 s must cover is one client's local training
plus, if the signal lands during it, the round's evaluation and checkpoint.
"""
from __future__ import annotations

import signal
import threading

_stop = threading.Event()


class Preempted(Exception):
    """Raised by the round loop when the ranks agreed to stop; rounds up to `completed` are done."""

    def __init__(self, completed: int, metrics_offset: int):
        super().__init__(f"stopped by a signal after round {completed}")
        self.completed = completed
        self.metrics_offset = metrics_offset  # the record up to the end of the completed round


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM: --signal=USR1@T, and SIGTERM at the time limit


def install() -> None:
    """Route the stop signals to the flag (their default action would kill the process)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: _stop.set())


def requested() -> bool:
    """This process received a stop signal."""
    return _stop.is_set()


def clear() -> None:
    _stop.clear()


def any_stopped(topology, timeout: float) -> bool:
    """True on every rank if any rank received a stop signal. Collective under MPI: every rank calls
    it once per round at the same point; the wait sleeps (no spinning) and aborts the job after
    `timeout` seconds like the round's own collective."""
    local = _stop.is_set()
    if topology is None or not topology.distributed:
        return local
    from pipeline.federation.distributed import Watchdog
    from pipeline.federation.torchcomm import api

    MPI = api(topology.world)  # mpi4py.MPI, or TorchComm's equivalents under torchrun

    Watchdog(timeout, topology.world, topology.rank).arrive("the stop check before the round's aggregation")
    return bool(topology.world.allreduce(int(local), op=MPI.MAX))


def pause(fed, stop: Preempted, save_round) -> None:
    """Checkpoint the completed rounds if the newest checkpoint is older (every rank calls it)."""
    from pipeline import checkpoint

    behind = None
    if fed.writes:
        latest = checkpoint.latest_checkpoint(fed.run_dir)
        behind = stop.completed > (int(latest.name.split("-")[1]) if latest is not None else -1)
    if fed.shards is not None:  # expert shards: every rank takes part in saving
        behind = fed.topology.world.bcast(behind, root=0)
    if behind:
        save_round(fed, stop.completed, offset=stop.metrics_offset)
