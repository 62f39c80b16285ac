from collections import Counter

from pipeline.config import Tier
from pipeline.federation.sampling import assign_tiers, derive_seed, local_batches, sample_clients

TIERS = [Tier(i, f"t{i}", b, 1, 1, s) for i, (b, s) in enumerate([(0.25, 1), (0.5, 1), (1.0, 2)])]


def test_tier_shares_are_respected():
    counts = Counter(t.name for t in assign_tiers(8, TIERS, seed=0))
    assert counts == {"t0": 2, "t1": 2, "t2": 4}
    assert assign_tiers(8, TIERS, 0) == assign_tiers(8, TIERS, 0)


def test_sampling_is_a_function_of_seed_and_round():
    a = sample_clients(20, 5, seed=3, round_=7)
    assert a == sample_clients(20, 5, seed=3, round_=7)
    assert len(set(a)) == 5 and all(0 <= c < 20 for c in a)
    assert any(sample_clients(20, 5, 3, r) != a for r in range(1, 6))


def test_local_batches_cover_client_data_and_repeat_epochs():
    idx = [3, 5, 9, 11, 14]
    batches = list(local_batches(idx, steps=4, batch_size=3, seed=derive_seed(0, 1, 2)))
    assert len(batches) == 4 and all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == idx  # the first epoch is a permutation of the client's data
    assert batches == list(local_batches(idx, 4, 3, derive_seed(0, 1, 2)))
