"""Dirichlet non-IID partition."""

import pytest

from pipeline.data import dirichlet_partition
from pipeline.data.partition import label_skew

LABELS = [f"family{i % 8}" for i in range(800)]


@pytest.mark.parametrize("alpha", [0.05, 0.5, 10.0])
def test_every_index_exactly_once(alpha):
    parts = dirichlet_partition(LABELS, 10, alpha, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(LABELS)))
    assert len(parts) == 10


def test_min_size_holds_even_when_very_skewed():
    for seed in range(5):
        parts = dirichlet_partition(LABELS, 20, 0.01, seed=seed, min_size=15)
        assert min(len(p) for p in parts) >= 15
        assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))


def test_skew_decreases_as_alpha_grows():
    def skew(alpha):
        return sum(label_skew(LABELS, dirichlet_partition(LABELS, 10, alpha, seed=s)) for s in range(3)) / 3

    low, mid, high = skew(0.05), skew(1.0), skew(100.0)
    assert low > mid > high
    assert high < 0.1 and low > 0.5


def test_deterministic_in_seed():
    assert dirichlet_partition(LABELS, 6, 0.3, seed=7) == dirichlet_partition(LABELS, 6, 0.3, seed=7)
    assert dirichlet_partition(LABELS, 6, 0.3, seed=7) != dirichlet_partition(LABELS, 6, 0.3, seed=8)


def test_integer_labels_and_bad_arguments():
    parts = dirichlet_partition([0, 1, 2] * 10, 3, 1.0, seed=0)
    assert sum(map(len, parts)) == 30
    with pytest.raises(ValueError):
        dirichlet_partition([0, 1], 3, 1.0, seed=0, min_size=1)
    with pytest.raises(ValueError):
        dirichlet_partition([0, 1], 1, 0.0, seed=0)
    with pytest.raises(ValueError):
        dirichlet_partition([0, 1], 0, 1.0, seed=0)
