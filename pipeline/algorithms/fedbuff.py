"""`fedbuff` (Nguyen et al., FedBuff): buffer K updates, then take one server step.

Each arrival adds `S(tau) Delta_i` with `S(tau) = 1 / sqrt(1 + tau)` and `Delta_i = x_i - x_{v_i}`
the client's progress from the version it trained from; after K arrivals
`x += eta_g * Delta / K` (ALGORITHMS.md section 6; the sign makes Delta the progress, not the
pseudo-gradient). The run's last, shorter buffer divides by its own count.
"""
from __future__ import annotations

import math

from pipeline.algorithms.asynchronous import AsyncStrategy, Buffered, add_to, delta, finite_weight
from pipeline.algorithms.base import register
from pipeline.algorithms.options import Option


@register
class FedBuff(AsyncStrategy):
    name = "fedbuff"
    option_spec = {
        "buffer_size": Option(4, int, low=1),  # K
        "server_lr": Option(1.0, float, low=0.0, open_low=True),  # eta_g
    }

    @property
    def buffer_size(self) -> int:
        return self.options["buffer_size"]

    @staticmethod
    def weight(staleness: int) -> float:
        return 1.0 / math.sqrt(1.0 + staleness)

    def arrival_contribution(self, item: Buffered, base):
        w = self.weight(item.staleness)
        out = {f"sum/{k}": v * w for k, v in delta(item.update.adapters, base).items()}
        out["count"] = finite_weight(1.0)
        return out

    def aggregate(self, sums, versions, ops) -> dict:
        count = sums["count"].item()
        step = {k[len("sum/"):]: v / count for k, v in sums.items() if k.startswith("sum/")}
        self.global_adapters = add_to(self.global_adapters, step, self.options["server_lr"])
        return {"buffered": int(count)}
