"""Run under `mpiexec -n 3`: groups {0, 1} and {2}; the groups hold different key sets (one
key only in group 1, one group's dtype mix differs); every rank must end with the direct sum."""
import torch
from mpi4py import MPI

from pipeline.federation.collectives import agree, allreduce_sums, local_spec, union_spec

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
assert comm.Get_size() == 3
group = 0 if rank < 2 else 1
group_comm = comm.Split(color=group, key=rank)
leaders = comm.Split(color=0 if group_comm.Get_rank() == 0 else MPI.UNDEFINED, key=rank)
leaders = None if leaders == MPI.COMM_NULL else leaders


def group_sums(g):
    gen = torch.Generator().manual_seed(10 + g)
    out = {"sum/a": torch.randn(64, 33, generator=gen, dtype=torch.float64),
           "weight": torch.tensor([3.0 + g], dtype=torch.float64),
           "counts": torch.randint(0, 1000, (4, 8), generator=gen)}
    if g == 1:
        out["only/in/group1"] = torch.randn(7, generator=gen).to(torch.float32)
        out["half"] = torch.randn(5, generator=gen).to(torch.bfloat16)
    return out


mine = group_sums(group)
specs = agree(local_spec(mine), group_comm, leaders)
assert len(specs) == 2
spec = union_spec(specs)
total = allreduce_sums(mine, spec, group_comm, leaders)
want = group_sums(0)
for k, v in group_sums(1).items():
    want[k] = want[k] + v if k in want else v
assert total.keys() == want.keys(), (sorted(total), sorted(want))
for k in want:
    assert total[k].dtype == want[k].dtype, k
    torch.testing.assert_close(total[k], want[k], rtol=1e-12, atol=0, msg=k)
everyone = comm.allgather({k: v.float().numpy().tobytes() for k, v in total.items()})
assert all(e == everyone[0] for e in everyone)
print(f"rank {rank}: ok", flush=True)
