"""Who owns which experts, who sums them and who writes them (federation/expert_shards.plan_shards)."""
import pytest

from pipeline.engine.parallel_dims import ParallelDims as D
from pipeline.federation.expert_shards import RankShard, is_expert_key, plan_shards


def test_groups_of_different_ep_sizes_share_the_finest_partition():
    # group 0: 4 ranks at ep 2 (ranks 2-3 replicate ranks 0-1's experts); group 1: 1 rank with
    # every expert; group 2: 4 ranks at ep 4, the finest: its ranks write checkpoints.
    fine, shards = plan_shards([D(4, 2), D(1, 1), D(4, 4)], 16)
    assert fine == 4
    assert shards[:5] == [RankShard(0, 8, True, False), RankShard(8, 16, True, False),
                          RankShard(0, 8, False, False), RankShard(8, 16, False, False),
                          RankShard(0, 16, True, False)]
    assert [(s.start, s.stop, s.writes) for s in shards[5:]] == [(0, 4, True), (4, 8, True),
                                                                  (8, 12, True), (12, 16, True)]
    # every expert has exactly one contributor per group and exactly one writer
    for e in range(16):
        owners = [s for s in shards if s.start <= e < s.stop]
        assert sum(s.contributes for s in owners) == 3 and sum(s.writes for s in owners) == 1


def test_ep_sizes_whose_lcm_does_not_divide_the_experts_are_refused():
    with pytest.raises(ValueError, match="lcm 6"):
        plan_shards([D(2, 2), D(3, 3)], 8)


def test_expert_keys_are_recognised_by_their_last_part():
    assert is_expert_key("sum/model.layers.0.mlp.lora_gate_up_A")
    assert is_expert_key("adapters/model.layers.3.mlp.lora_down_B")
    assert not is_expert_key("sum/model.layers.0.self_attn.q_proj.lora_A")
    assert not is_expert_key("ew_counts") and not is_expert_key("adapters/model.layers.0.mlp.phi")
