"""Cross-group aggregation (federation/collectives.py) against a raw MPI Allreduce of the same bytes.

Prints ratios, asserts nothing. Each rank plays one client group of one rank and holds a
contribution dict of float64 tensors (adapter-sized pieces plus a weight) totalling SIZE; the
timed path is what the runner does at the end of a round: agree on the key layout (small
allgather), pack into one buffer, `Allreduce(IN_PLACE)`, unpack into tensors. The reference is
`Allreduce(IN_PLACE)` on one preallocated numpy buffer of the same bytes: the floor.

    mpiexec -n 4 python -m mpi4py bench/aggregate.py [--sizes-mb 1 4 16 64 256] [--tensor-kb 512]

Ratio = ours / raw; the overhead is the key agreement, two copies (pack, unpack) and their
allocation, which matter most at small sizes and on shared-memory transports, where the
Allreduce itself is a memory copy too. On 2 cores with 4 ranks every rank competes for CPU,
so absolute times mean little; ratios are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from pipeline.federation.collectives import agree, allreduce_sums, local_spec, union_spec


def contribution(total_bytes: int, tensor_bytes: int, rank: int) -> dict[str, torch.Tensor]:
    n = total_bytes // 8
    per = max(1, tensor_bytes // 8)
    gen = torch.Generator().manual_seed(rank)
    out, i = {}, 0
    while n > 0:
        size = min(per, n)
        out[f"sum/layers.{i}.lora"] = torch.randn(size, generator=gen, dtype=torch.float64)
        n -= size
        i += 1
    out["weight"] = torch.tensor([1.0 + rank], dtype=torch.float64)
    return out


def timed(fn, comm, reps: int) -> float:
    times = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        comm.Barrier()  # the slowest rank's time
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--tensor-kb", type=int, default=512, help="bytes per adapter tensor")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    group_comm = comm.Split(color=rank, key=rank)  # groups of one rank: every rank leads
    leaders = comm.Split(color=0, key=rank)
    if rank == 0:
        print(f"{size} ranks, groups of 1 rank, float64 contributions in {args.tensor_kb} KB tensors")
        print(f"{'MB':>6} {'tensors':>8} {'raw s':>9} {'ours s':>9} {'ours/raw':>9}")
    for mb in args.sizes_mb:
        nbytes = int(mb * 2**20)
        sums = contribution(nbytes, args.tensor_kb * 1024, rank)
        raw = np.random.default_rng(rank).standard_normal(nbytes // 8)

        def ours():
            spec = union_spec(agree(local_spec(sums), group_comm, leaders))
            return allreduce_sums(sums, spec, group_comm, leaders)

        def reference():
            leaders.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)

        ours()  # warm-up (allocation, connection set-up)
        reference()
        t_ours = timed(ours, comm, args.reps)
        t_raw = timed(reference, comm, args.reps)
        if rank == 0:
            print(f"{mb:>6g} {len(sums):>8} {t_raw:>9.4f} {t_ours:>9.4f} {t_ours / t_raw:>9.2f}", flush=True)
        del sums, raw


if __name__ == "__main__":
    main()
