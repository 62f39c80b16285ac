"""The cross-group communicator under torchrun-style launchers: mpi4py's API subset, on gloo.

`torchrun`, `accelerate launch` (and `python -m torch.distributed.run` under SLURM) start the
ranks with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set and no MPI. The
topology then forms its client groups over `TorchComm` instead of `MPI.COMM_WORLD`; the round
loop, the collectives and the watchdog call the same methods either way, so the MPI code path is
unchanged.

The gloo process groups here are built directly (`ProcessGroupGloo` over a `PrefixStore`),
never through `init_process_group`: the default process group stays free for each client
group's own torch.distributed world, which DeepSpeed takes as its (one) world. The world comm's
store is the launcher's (`env://` rendezvous: torchrun's agent store on MASTER_ADDR:MASTER_PORT,
or one hosted by rank 0), so client groups' torch worlds rendezvous on other ports
(topology.init_torch).

What is implemented is exactly what fedmoe uses: Get_rank/Get_size, Split (+ COMM_NULL for
UNDEFINED), Split_type(COMM_TYPE_SHARED) by host name, Allreduce(IN_PLACE) and Bcast on numpy
buffers (in place, through `torch.from_numpy`), the lowercase allreduce/allgather/bcast of
small picklable objects, Barrier, Ibarrier (a request with Test(), for the watchdog's sleeping
wait), Free, and Abort (the launcher sees a worker fail and stops the others).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Gloo's own limit on one collective. The watchdog (federation.collective_timeout) is what
# aborts a stuck job; this only has to be longer than any limit a config may set.
_GLOO_TIMEOUT = datetime.timedelta(days=7)


class _Op:
    def __init__(self, name: str, fn: Callable[[Any, Any], Any], reduce_op):
        self.name, self.fn, self.reduce_op = name, fn, reduce_op

    def __repr__(self) -> str:
        return f"TorchComm.{self.name}"


SUM = _Op("SUM", lambda a, b: a + b, torch.distributed.ReduceOp.SUM)
MAX = _Op("MAX", max, torch.distributed.ReduceOp.MAX)
IN_PLACE = object()
UNDEFINED = -32766  # MPI's value; any negative color means "in no new communicator"
COMM_NULL = None
COMM_TYPE_SHARED = "shared"


def Get_processor_name() -> str:
    return socket.gethostname()


# The mpi4py.MPI names the federation code uses, for code that runs over either backend.
API = SimpleNamespace(SUM=SUM, MAX=MAX, IN_PLACE=IN_PLACE, UNDEFINED=UNDEFINED, COMM_NULL=COMM_NULL,
                      COMM_TYPE_SHARED=COMM_TYPE_SHARED, Get_processor_name=Get_processor_name)


def api(comm):
    """The MPI-like namespace for `comm`'s backend: this module's for a TorchComm, else mpi4py.MPI."""
    if isinstance(comm, TorchComm):
        return API
    from mpi4py import MPI

    return MPI


def launched() -> bool:
    """Started by a torchrun-style launcher with more than one rank."""
    if not all(v in os.environ for v in _ENV):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


class _Request:
    def __init__(self, work):
        self.work = work

    def Test(self) -> bool:
        if self.work.is_completed():
            self.work.wait()  # raises if the barrier failed
            return True
        return False

    def Wait(self) -> None:
        self.work.wait()


class TorchComm:
    """A communicator over `size` processes: a gloo process group made on first use."""

    def __init__(self, store, rank: int, size: int, name: str = "world"):
        self.store, self.rank, self.size, self.name = store, rank, size, name
        self._pg = None
        self._splits = 0  # Split calls so far: collective, so the same count on every member

    @classmethod
    def world(cls) -> "TorchComm":
        """The launcher's world, from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (`env://`).

        Reading the environment now matters: `init_distributed` later rewrites these variables
        for the client group's own torch world.
        """
        import torch.distributed as dist

        store, rank, size = next(dist.rendezvous("env://", timeout=datetime.timedelta(minutes=10)))
        return cls(dist.PrefixStore("fedmoe", store), rank, size)

    # -- mpi4py's API ------------------------------------------------------------------------

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Split(self, color: int = 0, key: int = 0) -> "TorchComm | None":
        """Collective: members of equal `color` form a comm, ranked by (key, rank); a negative
        color (UNDEFINED) gets COMM_NULL (None)."""
        n = self._splits
        self._splits += 1
        pairs = self.allgather((int(color), int(key)))
        if color < 0:
            return COMM_NULL
        members = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        rank = [r for _, r in members].index(self.rank)
        import torch.distributed as dist

        name = f"{self.name}/s{n}c{color}"
        return TorchComm(dist.PrefixStore(name, self.store), rank, len(members), name)

    def Split_type(self, split_type, key: int = 0) -> "TorchComm":
        """COMM_TYPE_SHARED: the ranks on this host (by host name)."""
        if split_type != COMM_TYPE_SHARED:
            raise ValueError(f"TorchComm.Split_type: only COMM_TYPE_SHARED, got {split_type!r}")
        hosts = self.allgather(Get_processor_name())
        return self.Split(color=sorted(set(hosts)).index(hosts[self.rank]), key=key)

    def Free(self) -> None:
        self._pg = None  # gloo closes its pairs when the group is collected

    def Barrier(self) -> None:
        if self.size > 1:
            self.pg.barrier().wait()

    def Ibarrier(self) -> _Request:
        if self.size == 1:
            return _Done()
        return _Request(self.pg.barrier())

    def Allreduce(self, sendbuf, recvbuf: np.ndarray, op: _Op = SUM) -> None:
        if sendbuf is not IN_PLACE:
            np.copyto(recvbuf, sendbuf)
        if self.size > 1:
            opts = torch.distributed.AllreduceOptions()
            opts.reduceOp = op.reduce_op
            self.pg.allreduce([_tensor(recvbuf)], opts).wait()

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        if self.size > 1:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank, opts.rootTensor = root, 0
            self.pg.broadcast([_tensor(buf)], opts).wait()

    def allgather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        data = _bytes(obj)
        sizes = torch.zeros(self.size, dtype=torch.int64)
        sizes[self.rank] = data.numel()
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.SUM
        self.pg.allreduce([sizes], opts).wait()
        longest = int(sizes.max())
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        self.pg.allgather([out], [padded]).wait()
        return [pickle.loads(t[:int(n)].numpy().tobytes()) for t, n in zip(out, sizes)]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        data = _bytes(obj) if self.rank == root else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        self.pg.broadcast([size], opts).wait()
        if self.rank != root:
            data = torch.empty(int(size), dtype=torch.uint8)
        self.pg.broadcast([data], opts).wait()
        return obj if self.rank == root else pickle.loads(data.numpy().tobytes())

    def allreduce(self, obj: Any, op: _Op = SUM) -> Any:
        values = self.allgather(obj)
        result = values[0]
        for value in values[1:]:
            result = op.fn(result, value)
        return result

    def Abort(self, errorcode: int = 1) -> None:
        """End this process at once; the launcher sees a failed worker and stops the others."""
        sys.stderr.write(f"fedmoe: rank {self.rank} of the {self.name} comm aborts (exit {errorcode})\n")
        sys.stderr.flush()
        os._exit(errorcode)

    # -- internals ---------------------------------------------------------------------------

    @property
    def pg(self):
        if self._pg is None:  # every member reaches its first collective: they connect here
            self._pg = torch.distributed.ProcessGroupGloo(self.store, self.rank, self.size, _GLOO_TIMEOUT)
        return self._pg

    def __repr__(self) -> str:
        return f"TorchComm({self.name!r}, rank {self.rank} of {self.size})"


class _Done:
    def Test(self) -> bool:
        return True

    def Wait(self) -> None:
        pass


def _bytes(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def _tensor(buf: np.ndarray) -> torch.Tensor:
    if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.flags.writeable):
        raise TypeError("TorchComm: buffers must be writable, C-contiguous numpy arrays")
    return torch.from_numpy(buf)

