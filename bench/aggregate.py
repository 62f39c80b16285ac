"""Cross-group aggregation (federation/collectives.py) against a raw MPI Allreduce of the same bytes.

Prints ratios, asserts nothing. Each rank plays one client group of one rank whose clients'
contributions (float64 tensors, adapter-sized pieces plus a weight, totalling SIZE) were added
into a `PackedSums` as they finished, as the round loop does. Timed is what the round loop does at the
end of a round: agree on the key layout (a small allgather; in the round loop it rides on the
round's metadata exchange, which happens anyway), `Allreduce(IN_PLACE)` on the PackedSums'
buffers, and the views of the result. The reference is `Allreduce(IN_PLACE)` on one
preallocated numpy buffer of the same bytes: the floor. For comparison, `pack` is the path
for a plain dict of sums: the same plus a copy into a fresh buffer (the round loop's path before
PackedSums).

    mpiexec -n 4 python -m mpi4py bench/aggregate.py [--sizes-mb 1 4 16 64 256] [--tensor-kb 512]

On 2 cores with 4 ranks every rank competes for CPU, so absolute times mean little; ratios
are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from pipeline.federation.collectives import PackedSums, gather_from_leaders, allreduce_sums, local_spec, union_spec


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
        print("ratios to raw: sums = in-place Allreduce of the PackedSums; +layout = with the layout "
              "allgather; dict = a plain dict packed first")
        print(f"{'MB':>6} {'tensors':>8} {'raw s':>9} {'sums s':>9} {'sums':>6} {'+layout':>8} {'dict':>6}")
    for mb in args.sizes_mb:
        nbytes = int(mb * 2**20)
        contrib = contribution(nbytes, args.tensor_kb * 1024, rank)
        sums = PackedSums()
        sums.add(contrib)
        raw = np.random.default_rng(rank).standard_normal(nbytes // 8)

        def layout():
            return union_spec(gather_from_leaders(local_spec(sums.packed_tensors()), group_comm, leaders))

        spec = layout()
        runs = {"raw": lambda: leaders.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
                "sums": lambda: allreduce_sums(sums, spec, group_comm, leaders),
                "+layout": lambda: allreduce_sums(sums, layout(), group_comm, leaders),
                "dict": lambda: allreduce_sums(contrib, layout(), group_comm, leaders)}
        for fn in runs.values():  # warm-up (allocation, connection set-up)
            fn()
        t = {name: timed(fn, comm, args.reps) for name, fn in runs.items()}
        if rank == 0:
            ratios = " ".join(f"{t[n] / t['raw']:>{w}.2f}" for n, w in (("sums", 6), ("+layout", 8), ("dict", 6)))
            print(f"{mb:>6g} {len(contrib):>8} {t['raw']:>9.4f} {t['sums']:>9.4f} {ratios}", flush=True)


if __name__ == "__main__":
    main()
