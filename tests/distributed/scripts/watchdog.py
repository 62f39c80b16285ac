"""Run under `mpiexec -n 2`: rank 1 never reaches the collective; rank 0's watchdog (1 s)
must abort the job with a message instead of waiting forever. argv: arrive | guard."""
import sys
import time

from mpi4py import MPI

from pipeline.federation.distributed import Watchdog

comm = MPI.COMM_WORLD
mode = sys.argv[1]
if comm.Get_rank() == 1:
    time.sleep(120)  # a stuck rank (a hung client, a dead node)
watchdog = Watchdog(1.0, comm, comm.Get_rank())
if mode == "arrive":
    watchdog.arrive("the end of the round")
else:
    with watchdog.guard("the test collective"):
        comm.Barrier()
print("rank 0 passed the collective: the watchdog did not fire", flush=True)
