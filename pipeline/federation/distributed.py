"""The round loop's MPI glue: who logs, the end-of-round collective, and a watchdog.

`rounds.run_round` trains only this group's clients and then calls `reduce_round`, which
replaces the group's sums, expert loads, accepted clients and updates with the whole world's.
Only world rank 0 writes files: the other ranks' `client`/`reject` events travel with the
round's collective and rank 0 logs them in client order, as the single-process run does.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from pipeline.federation.collectives import PackedSums, gather_from_leaders, allreduce_sums, local_spec, union_spec
from pipeline.federation.expert_shards import ExpertShards, whole_spec

_LOAD = "\x00load/"  # expert loads per tier ride in the same buffer as the contributions


class GroupMetrics:
    """MetricsLogger front for a multi-rank run: rank 0 holds the logger, other ranks None.

    Per-client events wait in `pending` until the round's collective carries them to rank 0.
    """

    PER_CLIENT = ("client", "reject")

    def __init__(self, logger=None):
        self.logger = logger
        self.pending: list[tuple[str, dict]] = []

    def log(self, event: str, **fields: Any) -> None:
        if event in self.PER_CLIENT:
            self.pending.append((event, fields))
        elif self.logger is not None:
            self.logger.log(event, **fields)

    def take(self) -> list[tuple[str, dict]]:
        pending, self.pending = self.pending, []
        return pending

    def offset(self) -> int:
        return self.logger.offset() if self.logger is not None else 0

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


class Watchdog:
    """Aborts the whole job (MPI or torchrun) when a collective waits longer than `limit` seconds.

    Under torchrun-style launchers `comm` is a TorchComm: Ibarrier is a gloo barrier polled the
    same way, and Abort ends this process, after which the launcher stops the other workers.

    A dead or stuck rank would otherwise leave every other rank blocked forever. The wait
    includes the slowest group's local training, so the limit is generous by default.
    """

    def __init__(self, limit: float, comm, rank: int):
        self.limit, self.comm, self.rank = limit, comm, rank

    def arrive(self, what: str, poll: float = 0.002) -> None:
        """Wait until every rank reached this point, sleeping between polls.

        MPI implementations spin in blocking collectives; ranks that finished their clients
        early would then take the CPU from the ones still training or evaluating when ranks share
        cores. The collectives that follow find everyone present.
        """
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + self.limit if self.limit else None
        while not request.Test():
            if deadline is not None and time.monotonic() > deadline:
                self._abort(what)
            time.sleep(poll)

    @contextmanager
    def guard(self, what: str):
        if not self.limit or self.comm is None:
            yield
            return
        done = threading.Event()
        thread = threading.Thread(target=self._watch, args=(done, what), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()

    def _watch(self, done: threading.Event, what: str) -> None:
        if not done.wait(self.limit):
            self._abort(what)

    def _abort(self, what: str) -> None:
        sys.stderr.write(f"fedmoe: rank {self.rank}: {what} waited more than {self.limit:g} s "
                         f"(federation.collective_timeout): another rank is stuck or dead; "
                         f"aborting the job\n")
        sys.stderr.flush()
        time.sleep(1.0)  # the launcher forwards output asynchronously; Abort would cut the message off
        self.comm.Abort(3)


def reduce_round(topology, timeout: float, metrics, sums: PackedSums,
                 load: dict[str, Tensor], accepted: list[int], records: list,
                 shards: ExpertShards | None = None):
    """This group's round results -> the world's: (sums, load, accepted, records), identical on
    every rank except, with `shards`, the expert tensors (kept out of the packed sums): this
    rank's rows of the world's sums. `records` are small picklable objects (the clients'
    metadata, no tensors): every group's, in group order. Events of every group are logged by world rank 0, in
    client order. A collective that waits longer than `timeout` seconds (0: no limit) aborts
    the job. Afterwards `sums.spec` is the agreed layout, for the next round's PackedSums."""
    if topology is None or not topology.distributed:
        return sums.tensors(), load, accepted, records
    watchdog = Watchdog(timeout, topology.world, topology.rank)
    sums.add({_LOAD + tier: counts for tier, counts in load.items()})
    experts = sums.plain
    events = metrics.take() if isinstance(metrics, GroupMetrics) else []
    mine = {"spec": local_spec(sums.packed_tensors()), "accepted": accepted, "events": events,
            "records": records,
            "experts": whole_spec(local_spec(experts), shards.num_experts) if shards else []}
    watchdog.arrive("the end of the round (waiting for every client group)")
    with watchdog.guard("the end-of-round metadata allgather"):
        groups = gather_from_leaders(mine, topology.group_comm, topology.leaders)
    spec = union_spec([g["spec"] for g in groups])
    with watchdog.guard("the cross-group Allreduce of client contributions"):
        total = allreduce_sums(sums, spec, topology.group_comm, topology.leaders)
    if shards is not None:
        with watchdog.guard("the Allreduce of expert contributions among each shard's owners"):
            total.update(shards.allreduce(experts, union_spec([g["experts"] for g in groups])))
    load = {k[len(_LOAD):]: v for k, v in total.items() if k.startswith(_LOAD)}
    sums = {k: v for k, v in total.items() if not k.startswith(_LOAD)}
    accepted = sorted(c for g in groups for c in g["accepted"])
    records = [r for g in groups for r in g["records"]]
    if isinstance(metrics, GroupMetrics) and metrics.logger is not None:
        every = [(e, f) for g in groups for e, f in g["events"]]
        for event, fields in sorted(every, key=lambda ef: ef[1].get("client", -1)):
            metrics.logger.log(event, **fields)
    return sums, load, accepted, records
