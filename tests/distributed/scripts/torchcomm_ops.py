"""Run under `torchrun --nproc_per_node 3`: TorchComm's Split, Allreduce, Bcast and object
collectives, then the packed cross-group sum over TorchComm groups {0, 1} and {2} (what
collectives_sum.py checks over MPI); the default process group must stay free."""
import numpy as np
import torch.distributed as dist

from pipeline.federation import torchcomm
from pipeline.federation.collectives import gather_from_leaders, allreduce_sums, local_spec, union_spec
from pipeline.federation.torchcomm import COMM_NULL, IN_PLACE, MAX, SUM, UNDEFINED, TorchComm
from uneven_sums import check_total, group_sums

assert torchcomm.launched()
comm = TorchComm.world()
rank = comm.Get_rank()
assert comm.Get_size() == 3

# Split: colors {0: ranks 0, 1}, {1: rank 2}; keys reverse the order inside color 0.
group = 0 if rank < 2 else 1
sub = comm.Split(color=group, key=-rank)
assert sub.Get_size() == (2 if group == 0 else 1)
assert sub.Get_rank() == ({0: 1, 1: 0, 2: 0}[rank])
odd = comm.Split(color=0 if rank % 2 == 0 else UNDEFINED, key=rank)
assert (odd is COMM_NULL) == (rank == 1)
if odd is not None:
    assert (odd.Get_rank(), odd.Get_size()) == ({0: 0, 2: 1}[rank], 2)
node = comm.Split_type(torchcomm.COMM_TYPE_SHARED, key=rank)
assert (node.Get_rank(), node.Get_size()) == (rank, 3)  # one host
node.Free()

# Allreduce in place on numpy buffers, per dtype; Bcast from a non-zero root.
for dtype in (np.float64, np.float32, np.int64, np.int32):
    buf = np.arange(5, dtype=dtype) * (rank + 1)
    comm.Allreduce(IN_PLACE, buf, op=SUM)
    assert buf.tolist() == (np.arange(5, dtype=dtype) * 6).tolist(), (dtype, buf)
    buf = np.full(4, rank, dtype=dtype)
    comm.Allreduce(IN_PLACE, buf, op=MAX)
    assert buf.tolist() == [2] * 4
buf = np.full(3, float(rank))
comm.Bcast(buf, root=2)
assert buf.tolist() == [2.0] * 3
if group == 0:  # a sub-comm's collectives involve only its members
    buf = np.array([1.5 * (rank + 1)])
    sub.Allreduce(IN_PLACE, buf, op=SUM)
    assert buf.tolist() == [4.5]

# Objects of different sizes per rank.
assert comm.allgather({"r": rank, "pad": "x" * (100 * rank)}) == [{"r": r, "pad": "x" * (100 * r)} for r in range(3)]
assert comm.bcast({"port": 1234} if rank == 1 else None, root=1) == {"port": 1234}
assert comm.allreduce(int(rank == 1), op=MAX) == 1 and comm.allreduce(rank, op=SUM) == 3
request = comm.Ibarrier()
while not request.Test():
    pass
comm.Barrier()

# The packed cross-group sum (federation/collectives.py) over these comms.
leaders = comm.Split(color=0 if sub.Get_rank() == 0 else UNDEFINED, key=rank)

mine = group_sums(group)
spec = union_spec(gather_from_leaders(local_spec(mine), sub, leaders))
total = allreduce_sums(mine, spec, sub, leaders)
check_total(total)

assert not dist.is_initialized()  # the default group is left for a client group's DeepSpeed world
print(f"rank {rank}: ok", flush=True)
