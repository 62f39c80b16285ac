"""The asynchronous Strategy API (ALGORITHMS.md section 6, docs/async.md).

An asynchronous method aggregates a buffer of updates that trained from older versions of the
global adapters. As in the synchronous API, aggregation is map-reduce so that it is one
collective across client groups: `arrival_contribution` maps one buffered update (with its base
version's adapters and its staleness) to tensors summed over the buffer, and `aggregate(sums,
versions, ops)` makes the new global adapters from them. When it aggregates is the method's
`buffer_size` (K arrivals) and `t_max` (virtual time since the last aggregation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.algorithms.base import ClientUpdate, Strategy


@dataclass
class Buffered:
    """One arrived update as the server sees it."""

    update: ClientUpdate
    base_version: int
    staleness: int  # versions between the one it trained from and the one it is applied to
    uploads: int  # the client's earlier uploads


class AsyncStrategy(Strategy):
    asynchronous = True
    expert_sharded = False  # the buffer is aggregated on whole tensors

    def __init__(self, options, model, tiers):
        super().__init__(options, model, tiers)
        self.version = 0  # aggregations so far
        self.versions: dict[int, dict[str, Tensor]] = {}  # adapters of the versions still trained from

    def state_dict(self) -> dict[str, Any]:
        """The global adapters and every older version an in-flight or buffered update trained
        from (the current one is the global adapters)."""
        state = super().state_dict()
        for v, adapters in self.versions.items():
            if v != self.version:
                state["tensors"].update({f"versions/{v}/{k}": t for k, t in adapters.items()})
        state["meta"] = {**state["meta"], "version": self.version}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.version = int(state["meta"].get("version", 0))
        self.versions = {self.version: self.global_adapters}
        for key, value in state["tensors"].items():
            if key.startswith("versions/"):
                _, v, name = key.split("/", 2)
                self.versions.setdefault(int(v), {})[name] = value.clone()

    @property
    def buffer_size(self) -> int:
        return 1

    @property
    def t_max(self) -> float | None:
        return None

    def contribution(self, update: ClientUpdate):
        raise TypeError(f"{self.name} is asynchronous: it has no synchronous round")

    def finalize(self, sums):
        raise TypeError(f"{self.name} is asynchronous: it has no synchronous round")

    def arrival_contribution(self, item: Buffered, base: dict[str, Tensor]) -> dict[str, Tensor]:
        """`item`'s tensors, summed over the buffer; `base`: the adapters it trained from."""
        raise NotImplementedError

    def aggregate(self, sums: dict[str, Tensor], versions: dict[int, dict[str, Tensor]], ops) -> dict[str, Any]:
        """The new global adapters from the buffer's `sums`; `versions`: the adapters of every
        base version in the buffer; `ops`: the server's handle on the model (AlignFed's
        alignment). Returns the method's metrics of the aggregation."""
        raise NotImplementedError


def delta(update: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, Tensor]:
    """The client's progress `x_i - x_{v_i}`, in float64."""
    return {k: update[k].double() - base[k].double() for k in base}


def staleness_weight(kind: str, tau: int, a: float, b: float) -> float:
    """FedAsync's S(t - tau): constant 1; polynomial (tau + 1)^-a; hinge 1 up to b, then
    1 / (a (tau - b) + 1)."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")


def is_async(strategy_cls) -> bool:
    return bool(getattr(strategy_cls, "asynchronous", False))


def add_to(target: dict[str, Tensor], step: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """`target + scale * step` in float64, cast back to each target tensor's dtype."""
    return {k: (v.double() + scale * step[k]).to(v.dtype) if k in step else v for k, v in target.items()}


def finite_weight(value: float) -> Tensor:
    return torch.tensor([float(value)], dtype=torch.float64)
