"""`federation.placement: queue`: client groups pull the round's clients as they free up.

Under `tier` and `balanced` every rank computes the round's placement before it starts, so a
group that finishes early waits at the end-of-round collective for the slowest one. Here the
round's clients stand in one queue (the balanced plan's costliest first) and each group takes
the next one whenever it is free, as a simulation engine's actors do. The queue is a counter in
a c10d TCPStore hosted by world rank 0: its server answers from its own thread, so a leader's
`add` never waits for rank 0 to finish a client (an MPI one-sided counter would, without an
asynchronous progress thread). Each group's leader draws and hands the index to its ranks.

Which group trains a client then depends on timing. Every client's update is the same on any
group of the same layout, and the cross-group sums are float64, so a run is reproducible up to
the rounding of those sums to float32 (a tie now and then on a large adapter set); on groups of
different layouts a client's update differs within the data-parallel bound (docs/placement.md).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import timedelta


class ClientQueue:
    """The run's shared counter; `pull(round_, order)` yields this group's share of `order`."""

    def __init__(self, topology, timeout: float):
        from torch.distributed import TCPStore

        from pipeline.engine.client import free_port
        from pipeline.federation.torchcomm import api

        world, MPI = topology.world, api(topology.world)
        self.group_comm, self.leader = topology.group_comm, topology.is_leader
        hosts = world.allgather(MPI.Get_processor_name())
        host = os.environ.get("FEDMOE_MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
        wait = timedelta(seconds=timeout or 24 * 3600)
        self.store = None
        if topology.rank == 0:  # the server exists before anyone learns its port
            self.store = TCPStore(host, free_port(), is_master=True, wait_for_workers=False, timeout=wait)
        port = world.bcast(self.store.port if self.store is not None else None, root=0)
        if self.store is None and self.leader:
            self.store = TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=wait)

    def pull(self, round_: int, order: Sequence[int]) -> Iterator[int]:
        """The clients of `order` this group trains, one at a time, as it asks for them."""
        while True:
            index = self.store.add(f"round-{round_}", 1) - 1 if self.leader else None
            if self.group_comm is not None and self.group_comm.Get_size() > 1:
                index = self.group_comm.bcast(index, root=0)
            if index >= len(order):
                return
            yield order[index]
