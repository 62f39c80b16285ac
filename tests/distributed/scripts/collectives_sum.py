"""Run under `mpiexec -n 3`: groups {0, 1} and {2}; the groups hold different key sets (one
key only in group 1, one group's dtype mix differs); every rank must end with the direct sum."""
from mpi4py import MPI

from pipeline.federation.collectives import gather_from_leaders, allreduce_sums, local_spec, union_spec
from uneven_sums import check_total, group_sums

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
assert comm.Get_size() == 3
group = 0 if rank < 2 else 1
group_comm = comm.Split(color=group, key=rank)
leaders = comm.Split(color=0 if group_comm.Get_rank() == 0 else MPI.UNDEFINED, key=rank)
leaders = None if leaders == MPI.COMM_NULL else leaders

mine = group_sums(group)
specs = gather_from_leaders(local_spec(mine), group_comm, leaders)
assert len(specs) == 2
spec = union_spec(specs)
total = allreduce_sums(mine, spec, group_comm, leaders)
check_total(total)
everyone = comm.allgather({k: v.float().numpy().tobytes() for k, v in total.items()})
assert all(e == everyone[0] for e in everyone)
print(f"rank {rank}: ok", flush=True)
