"""Rank 1 never reaches the collective; rank 0's watchdog (1 s) must end the job with a message
instead of waiting forever. argv: arrive | guard, then `mpi` (under `mpiexec -n 2`: MPI_Abort)
or `torch` (under `torchrun --nproc_per_node 2`, over TorchComm: the rank's process ends and
the launcher stops rank 1)."""
import sys
import time

from pipeline.federation.distributed import Watchdog

mode, comms = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mpi"
if comms == "torch":
    from pipeline.federation.torchcomm import TorchComm

    comm = TorchComm.world()
    comm.Barrier()  # both connected: what follows is a stuck rank, not a slow start
else:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
if comm.Get_rank() == 1:
    time.sleep(120)  # a stuck rank (a hung client, a dead node)
watchdog = Watchdog(1.0, comm, comm.Get_rank())
if mode == "arrive":
    watchdog.arrive("the end of the round")
else:
    with watchdog.guard("the test collective"):
        comm.Barrier()
print("rank 0 passed the collective: the watchdog did not fire", flush=True)
