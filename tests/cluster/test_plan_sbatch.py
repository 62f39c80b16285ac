"""`fedmoe plan --sbatch`: packing client groups onto nodes, and the lines it prints."""
import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.plan.slurm import pack_groups, sbatch_plan, sbatch_text, submit_command
from pipeline.federation.topology import plan_layout
from tests.cluster.conftest import REPO, TINY


def pieces(sizes, gpus):
    return [list(node.pieces) for node in pack_groups(sizes, gpus)]


def test_groups_that_fit_one_node_share_it():
    assert pieces([1, 1, 2, 4], 8) == [[(0, 1), (1, 1), (2, 2), (3, 4)]]


def test_a_group_that_does_not_fit_the_room_left_starts_the_next_node():
    # 1 + 1 + 2 = 4 on node 0, the group of 4 would not fit the 0 left of 4: node 1
    assert pieces([1, 1, 2, 4], 4) == [[(0, 1), (1, 1), (2, 2)], [(3, 4)]]
    # 3 GPUs per node: 1 + 1 leave 1, the pair goes on; 4 > 3 spans a fresh node and the next
    assert pieces([1, 1, 2, 4], 3) == [[(0, 1), (1, 1)], [(2, 2)], [(3, 3)], [(3, 1)]]
    assert pieces([3, 3, 3], 4) == [[(0, 3)], [(1, 3)], [(2, 3)]]


def test_two_groups_per_tier_fill_two_nodes():
    assert pieces([1, 1, 2, 4, 1, 1, 2, 4], 8) == [[(0, 1), (1, 1), (2, 2), (3, 4)],
                                                   [(4, 1), (5, 1), (6, 2), (7, 4)]]


def test_a_group_wider_than_a_node_fills_whole_nodes_then_shares_its_last():
    assert pieces([10, 2, 4], 8) == [[(0, 8)], [(0, 2), (1, 2), (2, 4)]]
    assert pieces([2, 16], 8) == [[(0, 2)], [(1, 8)], [(1, 8)]]
    plan = sbatch_plan([10, 2, 4], 8)
    assert plan.split_groups == [0] and plan.tasks_per_node == [8, 8]


def test_single_rank_and_bad_node_size():
    assert pieces([1], 8) == [[(0, 1)]]
    with pytest.raises(UserError):
        pack_groups([1], 0)


def test_uniform_nodes_use_ntasks_per_node_only():
    plan = sbatch_plan([1, 1, 2, 4, 1, 1, 2, 4], 8)
    assert plan.options() == ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--gpus-per-node=8"]
    assert plan.env() == {}
    cmd = submit_command(plan, "c.yaml", "runs/x", ["tiers.0.ranks=1"])
    assert cmd == ("sbatch --nodes=2 --ntasks=16 --ntasks-per-node=8 --gpus-per-node=8 "
                   "slurm/fedmoe.sbatch c.yaml runs/x --set tiers.0.ranks=1")


def test_uneven_nodes_pass_the_per_node_counts_to_the_script():
    plan = sbatch_plan([1, 1, 2, 4], 3)
    assert plan.tasks_per_node == [2, 2, 3, 1]
    assert plan.options() == ["--nodes=4", "--ntasks=8", "--ntasks-per-node=3", "--gpus-per-node=3"]
    assert plan.env() == {"FEDMOE_TASKS_PER_NODE": "2,2,3,1"}
    # In sbatch's environment: --export=ALL,NAME=2,2,3,1 would give the job NAME=2 (real sbatch
    # in test_real_slurm.py runs this line).
    assert submit_command(plan, "c.yaml", "r", []).startswith("FEDMOE_TASKS_PER_NODE=2,2,3,1 sbatch --nodes=4 ")


def test_sbatch_text_for_the_tiny_config():
    cfg = load_config(TINY, ["tiers.0.ranks=1", "tiers.1.ranks=1"])
    text = sbatch_text(cfg, plan_layout(cfg, 2), str(TINY.relative_to(REPO)), "runs/t", [], 8)
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --gpus-per-node=2" in text
    assert "submit: sbatch --nodes=1 --ntasks=2" in text
    assert "#SBATCH hetjob" in text  # one group per tier: the het job applies
    cfg4 = load_config(TINY)
    assert "hetjob" not in sbatch_text(cfg4, plan_layout(cfg4, 4), "c", "r", [], 8)  # 2 groups per tier


def test_the_het_job_is_offered_only_with_one_group_per_tier():
    cfg = load_config(REPO / "configs" / "olmoe-1b-7b" / "ubsmoe.yaml")
    eight = sbatch_text(cfg, plan_layout(cfg, 8), "c", "r", [], 8)
    assert eight.count("#SBATCH hetjob") == 3 and "(or use the het job below)" in eight
    sixteen = sbatch_text(cfg, plan_layout(cfg, 16), "c", "r", [], 4)
    assert "hetjob" not in sixteen and "het job" not in sixteen
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks=16\n#SBATCH --ntasks-per-node=4" in sixteen
