"""Non-IID client splits: Dirichlet over labels (the papers' split over task families)."""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

__all__ = ["dirichlet_partition", "label_skew"]

_MAX_REDRAWS = 100


def _draw(by_label: list[np.ndarray], n_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One Dirichlet split: each label's indices go to clients in Dir(alpha) proportions."""
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for idx in by_label:
        idx = idx[rng.permutation(len(idx))]
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            clients[c].extend(part.tolist())
    return clients


def _top_up(clients: list[list[int]], min_size: int) -> None:
    """Move indices from the largest clients to those below `min_size` (rarely needed)."""
    for small in clients:
        while len(small) < min_size:
            donor = max(clients, key=len)
            small.append(donor.pop())


def dirichlet_partition(
    labels: Sequence[Hashable], n_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Split `range(len(labels))` among `n_clients`, label proportions ~ Dirichlet(alpha).

    Small `alpha` gives each client few labels (strongly non-IID); large `alpha` approaches
    an IID split. Every index is assigned exactly once; every client gets at least
    `min_size` indices (the split is redrawn, and as a last resort topped up from the
    largest clients). Deterministic in `seed`; each client's indices are sorted.
    """
    n = len(labels)
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n_clients * min_size > n:
        raise ValueError(f"{n} samples cannot give {n_clients} clients at least {min_size} each")
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    # A fixed label order (first appearance) keeps the split independent of hashing.
    by_label = [np.asarray(ix, dtype=np.int64) for ix in groups.values()]
    clients = _draw(by_label, n_clients, alpha, rng)
    for _ in range(_MAX_REDRAWS):
        if min(len(c) for c in clients) >= min_size:
            break
        clients = _draw(by_label, n_clients, alpha, rng)
    else:
        _top_up(clients, min_size)
    return [sorted(c) for c in clients]


def label_skew(labels: Sequence[Hashable], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the global mix.

    0 for a perfectly IID split, approaching 1 when every client holds one rare label.
    """
    values = sorted(set(labels), key=str)
    pos = {v: i for i, v in enumerate(values)}
    lab = np.asarray([pos[x] for x in labels])
    glob = np.bincount(lab, minlength=len(values)) / len(lab)
    dists = []
    for part in parts:
        if not part:
            continue
        local = np.bincount(lab[part], minlength=len(values)) / len(part)
        dists.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(dists))
