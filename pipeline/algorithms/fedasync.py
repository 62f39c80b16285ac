"""`fedasync` (Xie et al., FedAsync): mix each arriving update into the global adapters.

On each arrival `x = (1 - a_t) x + a_t x_new` with `a_t = alpha * S(staleness)`, S constant,
polynomial `(tau + 1)^-a` or hinge (ALGORITHMS.md section 6). One update per aggregation.
"""
from __future__ import annotations

from pipeline.algorithms.asynchronous import AsyncStrategy, Buffered, finite_weight, staleness_weight
from pipeline.algorithms.base import register
from pipeline.algorithms.options import Option


@register
class FedAsync(AsyncStrategy):
    name = "fedasync"
    option_spec = {
        "alpha": Option(0.6, float, 0.0, 1.0, open_low=True),  # the mixing weight of a fresh update
        "staleness": Option("polynomial", ("constant", "polynomial", "hinge")),
        "a": Option(0.5, float, low=0.0),  # polynomial exponent; hinge slope
        "b": Option(4, int, low=0),  # hinge: staleness tolerated at full weight
    }

    def mixing(self, staleness: int) -> float:
        o = self.options
        return o["alpha"] * staleness_weight(o["staleness"], staleness, o["a"], o["b"])

    def arrival_contribution(self, item: Buffered, base):
        alpha = self.mixing(item.staleness)
        out = {f"mix/{k}": v.double() * alpha for k, v in item.update.adapters.items()}
        out["alpha"] = finite_weight(alpha)
        return out

    def aggregate(self, sums, versions, ops) -> dict:
        alpha = sums["alpha"].item()
        self.global_adapters = {k: ((1.0 - alpha) * v.double() + sums[f"mix/{k}"]).to(v.dtype)
                                for k, v in self.global_adapters.items()}
        return {"alpha": alpha}
