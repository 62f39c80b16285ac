"""Expert-load balance of a [layers, experts] routed-token matrix (round records, report.md)."""
from __future__ import annotations

import numpy as np

LOW_LOAD = 0.1  # an expert below this share of the uniform load counts as (nearly) unused


def balance_stats(load: np.ndarray) -> dict:
    """Balance of a [layers, experts] routed-token matrix.

    cv: coefficient of variation (population std / mean) across experts, averaged over layers.
    low_load_share: share of (layer, expert) cells whose load is below LOW_LOAD x uniform.
    max_load: the busiest expert's load relative to uniform.
    entropy: entropy of each layer's load distribution over log(experts), averaged (1 = uniform).
    Layers without tokens are ignored.
    """
    load = np.atleast_2d(np.asarray(load, dtype=np.float64))
    used = load[load.sum(axis=1) > 0]
    if used.size == 0:
        return {"cv": None, "low_load_share": None, "max_load": None, "entropy": None, "layers": load.shape[0],
                "experts": load.shape[1], "routed_per_layer": 0.0}
    mean = used.mean(axis=1, keepdims=True)  # the uniform load of each layer
    relative = used / mean
    share = used / used.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1) / np.log(load.shape[1])
    return {"cv": float((used.std(axis=1) / mean[:, 0]).mean()),
            "entropy": float(entropy.mean()) if load.shape[1] > 1 else 1.0,
            "low_load_share": float((relative < LOW_LOAD).mean()),
            "max_load": float(relative.max()),
            "layers": int(load.shape[0]), "experts": int(load.shape[1]),
            "routed_per_layer": float(used.sum(axis=1).mean())}
