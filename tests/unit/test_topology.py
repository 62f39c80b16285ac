"""Layout of MPI ranks into client groups, and the per-round client assignment."""
import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.federation.topology import Layout, plan_layout

TINY = "tests/fixtures/tiny_run.yaml"


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_one_rank_is_the_single_process_group():
    layout = plan_layout(_cfg("tiers.0.ranks=2"), 1)
    assert [(g.tier, g.ranks) for g in layout.groups] == [(None, (0,))]
    assert layout.assign([3, 1], ["low"] * 4) == [[3, 1]]


def test_tiers_take_contiguous_ranks_round_robin():
    layout = plan_layout(_cfg("tiers.0.ranks=2", "tiers.1.ranks=2"), 4)
    assert [(g.tier, g.ranks) for g in layout.groups] == [("low", (0, 1)), ("high", (2, 3))]
    layout = plan_layout(_cfg("tiers.1.ranks=2"), 7)  # low 1, high 2, low 1, high 2, low 1
    assert [(g.tier, g.ranks) for g in layout.groups] == [
        ("low", (0,)), ("high", (1, 2)), ("low", (3,)), ("high", (4, 5)), ("low", (6,))]
    assert layout.group_of(5).index == 3


@pytest.mark.parametrize("ranks, overrides, match", [
    (3, ["tiers.0.ranks=2", "tiers.1.ranks=2"], "1 rank\\(s\\) left without a group; try 2 or 4"),
    (1 + 1, ["tiers.0.ranks=3", "tiers.1.ranks=3"], "2 rank\\(s\\) left"),
    (4, ["tiers.0.ranks=4", "train.batch_size=3"], "train.batch_size=3"),
])
def test_impossible_layouts_are_user_errors(ranks, overrides, match):
    with pytest.raises(UserError, match=match):
        plan_layout(_cfg(*overrides), ranks)


def test_tier_clients_go_round_robin_to_their_groups_and_homeless_ones_to_the_least_loaded():
    layout = plan_layout(_cfg("tiers.1.ranks=2"), 4)  # low (0), high (1-2), low (3)
    assert [g.tier for g in layout.groups] == ["low", "high", "low"]
    tiers = ["low", "high", "low", "low", "high", "low", "mid", "mid"]
    clients = [0, 1, 2, 3, 4, 5, 6, 7]
    per_group = layout.assign(clients, tiers)
    # low clients 0 2 3 5 alternate over groups 0 and 2; high clients 1 4 go to group 1;
    # the tier without a group ("mid") fills the least loaded group, lowest index first.
    assert per_group == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(c for g in per_group for c in g) == clients


def test_assignment_is_a_partition_for_every_round():
    from pipeline.federation.sampling import assign_tiers, sample_clients

    cfg = load_config(None, [])
    layout = plan_layout(cfg, 6)
    tiers = [t.name for t in assign_tiers(cfg.federation.clients, cfg.tiers, cfg.seed)]
    for round_ in range(1, 20):
        clients = sample_clients(cfg.federation.clients, cfg.federation.clients_per_round, cfg.seed, round_)
        per_group = layout.assign(clients, tiers)
        assert sorted(c for g in per_group for c in g) == clients
        for group, served in zip(layout.groups, per_group):
            assert all(tiers[c] == group.tier for c in served)  # every tier has a group here


def test_plan_command_prints_groups_and_errors_with_exit_code_2(capsys):
    from pipeline.cli import main

    assert main(["plan", "--config", TINY, "--ranks", "4", "--set", "tiers.0.ranks=2",
                 "--set", "tiers.1.ranks=2"]) == 0
    out = capsys.readouterr().out
    assert "4 rank(s) -> 2 client group(s)" in out and "2-3" in out and "high" in out
    assert main(["plan", "--config", TINY, "--ranks", "3", "--set", "tiers.0.ranks=2",
                 "--set", "tiers.1.ranks=2"]) == 2
    assert "left without a group" in capsys.readouterr().err


def test_layout_is_frozen_data():
    layout = plan_layout(_cfg(), 2)
    assert isinstance(layout, Layout) and layout.world_size == 2
    assert [g.tier for g in layout.groups] == ["low", "high"]
