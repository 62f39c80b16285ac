"""Whole weights outside a forward pass under DeepSpeed ZeRO stage 3.

At stage 3 every parameter holds only its rank's partition (`p.data` is empty between forward
passes). `gathered(params)` makes them whole for a block; with `modify=True` what rank 0 wrote
goes back into every rank's partition. Every rank of the engine's group must enter it (it is a
collective) and, with `modify`, write the same values. Without ZeRO-3 it does nothing, and
deepspeed is not imported.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextmanager
def gathered(params, modify: bool = False):
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
