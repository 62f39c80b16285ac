"""Deterministic federation plumbing: seeds, client tiers, per-round sampling, local batches.

Every random draw derives from (seed, round, client) through numpy's SeedSequence, so a run
resumed from any round boundary draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.config import Tier

# Streams keep draws for different purposes independent even with equal (round, client).
SAMPLING, LOCAL_DATA, ADAPTER_INIT, TIER_ASSIGNMENT, GA_INIT = 1, 2, 3, 4, 5


def derive_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def assign_tiers(n_clients: int, tiers: Sequence[Tier], seed: int) -> list[Tier]:
    """Client -> tier by the tiers' relative shares (largest remainder), shuffled by seed."""
    shares = np.array([t.share for t in tiers], dtype=float)
    exact = shares / shares.sum() * n_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_clients - counts.sum()]:
        counts[i] += 1
    order = [tier for tier, n in zip(tiers, counts) for _ in range(n)]
    perm = np.random.default_rng(derive_seed(seed, TIER_ASSIGNMENT)).permutation(n_clients)
    return [order[i] for i in perm]


def sample_clients(n_clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(seed, SAMPLING, round_))
    return sorted(int(c) for c in rng.choice(n_clients, size=per_round, replace=False))


def local_batches(indices: Sequence[int], steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches drawn by walking seeded permutations of the client's data (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: list[int] = []
    for _ in range(math.ceil(needed / max(1, len(indices)))):
        order.extend(indices[i] for i in torch.randperm(len(indices), generator=gen).tolist())
    for s in range(steps):
        yield order[s * batch_size:(s + 1) * batch_size]
