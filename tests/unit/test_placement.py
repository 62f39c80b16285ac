"""Client placement (federation/placement.py): the LPT scheduler against the optimal makespan,
memory fits, the learned cost model and its checkpointed state, and `fedmoe plan`'s prediction."""
import itertools
import random

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.federation.placement import CostModel, Placement, busy_seconds, fit_matrix, lpt, utilisation
from pipeline.federation.topology import plan_layout
from pipeline.plan.memory import model_shape, plan_memory
from pipeline.plan.utilisation import mean_utilisation, schedule

UBSMOE = "configs/olmoe-1b-7b/ubsmoe.yaml"


def optimal_makespan(costs, spc, allowed=None):
    """Brute force over every assignment."""
    m = len(spc)
    best = float("inf")
    for groups in itertools.product(range(m), repeat=len(costs)):
        if allowed is not None and any(g not in allowed[j] for j, g in enumerate(groups)):
            continue
        best = min(best, max(busy_seconds(groups, costs, spc)))
    return best


@pytest.mark.parametrize("speeds", ["equal", "uneven"])
def test_lpt_is_within_its_bound_of_the_optimal_makespan(speeds):
    rng = random.Random(7)
    worst = 1.0
    for _ in range(150):
        m = rng.randint(2, 3)
        n = rng.randint(1, 7)
        costs = [rng.choice([1, 2, 3, 5, 8]) * rng.uniform(0.9, 1.1) for _ in range(n)]
        spc = [1.0] * m if speeds == "equal" else [1.0 / rng.choice([1, 2, 4]) for _ in range(m)]
        got = max(busy_seconds(lpt(costs, spc), costs, spc))
        best = optimal_makespan(costs, spc)
        # Graham 1969 on equal groups; Gonzalez, Ibarra and Sahni 1977 on groups of different speeds
        bound = 4 / 3 - 1 / (3 * m) if speeds == "equal" else 2 * m / (m + 1)
        assert best - 1e-12 <= got <= bound * best + 1e-12, (costs, spc)
        worst = max(worst, got / best)
    assert worst > 1.0  # the cases are not all trivial: LPT is not always optimal on them


def test_lpt_hand_made_cases():
    # Graham's tight instance on 2 equal machines: 3, 3, 2, 2, 2 -> LPT 7, optimum 6.
    costs = [3, 3, 2, 2, 2]
    assert max(busy_seconds(lpt(costs, [1, 1]), costs, [1, 1])) == 7
    assert optimal_makespan(costs, [1, 1]) == 6
    # A 4x faster group takes the big job (done at 2); the small ones finish first on the slow one.
    costs, spc = [8, 1, 1], [1.0, 0.25]
    assert lpt(costs, spc) == [1, 0, 0]
    assert max(busy_seconds(lpt(costs, spc), costs, spc)) == optimal_makespan(costs, spc) == 2.0


def test_lpt_keeps_jobs_on_their_allowed_groups():
    rng = random.Random(3)
    for _ in range(100):
        m, n = 3, rng.randint(1, 6)
        costs = [rng.uniform(1, 5) for _ in range(n)]
        spc = [1.0, 0.5, 0.25]
        allowed = [rng.sample(range(m), rng.randint(1, m)) for _ in range(n)]
        groups = lpt(costs, spc, allowed)
        assert all(g in allowed[j] for j, g in enumerate(groups))
        assert max(busy_seconds(groups, costs, spc)) >= optimal_makespan(costs, spc, allowed) - 1e-12


def _cfg(*overrides):
    return load_config(UBSMOE, list(overrides))


def test_a_tier_that_does_not_fit_a_group_never_lands_there():
    # t1's 1-GPU group at 26 GiB: top-k 2 (22.3 GiB) fits 90% of it, top-k 4 and above do not
    # without activation checkpointing; with it (auto, the default) they all do.
    cfg = _cfg("tiers.0.gpu_memory_gb=26", "federation.placement=balanced", "train.activation_checkpointing=off")
    shape = model_shape(cfg.model.source)
    layout = plan_layout(cfg, 8)
    rows = {r.tier: r for r in plan_memory(cfg, 8, shape)}
    fits = fit_matrix(cfg, shape, layout, [2, 4, 6, 8])
    assert fits[0][0] and not any(fits[t][0] for t in (1, 2, 3))
    assert rows["t1"].fits  # the table fedmoe plan prints agrees for the tier's own group
    assert all(row[0] for row in fit_matrix(_cfg("tiers.0.gpu_memory_gb=26"), shape, layout, [2, 4, 6, 8]))
    client_tiers = _tier_names(cfg)
    planned = schedule(cfg, layout, shape, "balanced")
    placed_on_0 = [c for r in planned for c in r.groups[0]]
    assert placed_on_0 and all(client_tiers[c] == "t1" for c in placed_on_0)
    # ...while without the limit balanced does put other tiers' clients there
    free = schedule(_cfg("federation.placement=balanced"), layout, shape, "balanced")
    assert any(client_tiers[c] != "t1" for r in free for c in r.groups[0])


def test_balanced_beats_tier_on_the_shipped_config_and_places_every_client_once():
    cfg = _cfg()
    shape = model_shape(cfg.model.source)
    for ranks in (8, 16):
        layout = plan_layout(cfg, ranks)
        tier, balanced = (schedule(cfg, layout, shape, m) for m in ("tier", "balanced"))
        for t, b in zip(tier, balanced):
            assert sorted(c for g in t.groups for c in g) == sorted(c for g in b.groups for c in g)
            assert len({c for g in b.groups for c in g}) == cfg.federation.clients_per_round
            assert b.wall <= t.wall + 1e-12  # never predicted slower than the tier placement
            assert t.groups == layout.assign(sorted(c for g in t.groups for c in g),
                                              _tier_names(cfg))
        assert mean_utilisation(balanced) > mean_utilisation(tier)


def _tier_names(cfg):
    from pipeline.federation.sampling import assign_tiers

    return [t.name for t in assign_tiers(cfg.federation.clients, cfg.tiers, cfg.seed)]


def test_utilisation_is_busy_gpu_seconds_over_gpus_times_the_round():
    assert utilisation([4.0, 1.0, 2.0], [1, 1, 2]) == pytest.approx((4 + 1 + 4) / (4 * 4.0))
    assert utilisation([4.0, 1.0], [1, 3], wall=8.0) == pytest.approx((4 + 3) / (4 * 8.0))
    assert utilisation([0.0, 0.0], [1, 1]) is None


def test_the_cost_model_learns_and_its_state_restores_the_placement():
    cfg = _cfg("federation.placement=balanced")
    shape = model_shape(cfg.model.source)
    layout = plan_layout(cfg, 8)
    from pipeline.plan.utilisation import planned_placement

    a = planned_placement(cfg, layout, shape, "balanced")
    clients = list(range(8))
    first = a.assign(clients)
    planned = a.model.seconds()
    # Group 3 (4 GPUs) measures 10x slower than planned: it loses work the next round.
    seconds = {c: planned[a.client_tiers[c]][g] * (10 if g == 3 else 1)
               for g, members in enumerate(first) for c in members}
    record = a.observe(seconds, wall=max(a.current.predicted) * 10)
    assert record["busy_seconds"][3] == pytest.approx(10 * record["predicted_seconds"][3])
    learned = a.model.seconds()
    for t in range(4):  # every tier on group 3, measured or not, is now 10x its plan; the rest as planned
        assert learned[t][3] == pytest.approx(10 * planned[t][3])
        assert learned[t][0] == pytest.approx(planned[t][0])
    second = a.assign(clients)
    work = lambda groups, g: sum(a.costs[a.client_tiers[c]] for c in groups[g])  # noqa: E731
    assert work(second, 3) < work(first, 3)
    # A fresh placement given the state places as the learned one does; another layout's state is ignored.
    b = planned_placement(cfg, layout, shape, "balanced")
    b.load_state_dict(a.state_dict())
    assert b.assign(clients) == a.assign(clients)
    c = planned_placement(cfg, plan_layout(cfg, 16), shape, "balanced")
    c.load_state_dict(a.state_dict())
    assert all(r is None for row in c.model.ratios for r in row)
    # A JSON round trip (state.json) keeps every bit.
    import json

    d = planned_placement(cfg, layout, shape, "balanced")
    d.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert d.model.ratios == a.model.ratios and d.model.seconds() == a.model.seconds()


def test_unmeasured_pairs_take_their_groups_and_tiers_factors():
    layout = plan_layout(_cfg(), 8)  # groups of 1, 1, 2, 4 GPUs
    model = CostModel(layout, costs=[1.0, 2.0, 3.0, 4.0], nominal_tflops=1.0)
    plan = model.seconds()
    # Tier 0 measured at 2x its plan on group 0, tier 1 at 1x on groups 0 and 1.
    model.observe({(0, 0): 2 * plan[0][0], (1, 0): plan[1][0], (1, 1): plan[1][1]},
                  {(0, 0): 1, (1, 0): 1, (1, 1): 1})
    got = model.seconds()
    assert got[0][0] == pytest.approx(2 * plan[0][0]) and got[1][1] == pytest.approx(plan[1][1])
    assert got[0][1] == pytest.approx(2 * plan[0][1], rel=1e-6)  # tier 0 costs 2x its FLOPs anywhere
    assert got[1][3] == pytest.approx(plan[1][3], rel=1e-6)  # group 3 unmeasured: the groups' mean (1x)
    # Tier 2 unmeasured: the mean of the measured tiers on the group (2x and 1x -> 1.5x).
    assert got[2][0] == pytest.approx(1.5 * plan[2][0], rel=1e-6)
    # Smoothing: half the old ratio, half the new.
    model.observe({(0, 0): 4 * plan[0][0]}, {(0, 0): 1})
    assert model.ratios[0][0] == pytest.approx(3.0)


def test_one_group_takes_every_client():
    layout = plan_layout(_cfg(), 1)
    placement = Placement("balanced", layout, ["t1", "t2", "t3", "t4"], [0, 1, 2, 3] * 5, [1, 2, 3, 4],
                          [[True]] * 4)
    assert placement.assign([3, 1, 7]) == [[1, 3, 7]]


def test_an_unknown_placement_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.placement"):
        _cfg("federation.placement=fastest")


def test_queue_refuses_a_tier_that_does_not_fit_every_group():
    from pipeline.config import resolve_tiers
    from pipeline.federation.sampling import assign_tiers

    cfg = _cfg("tiers.0.gpu_memory_gb=26", "federation.placement=queue", "train.activation_checkpointing=off")
    shape = model_shape(cfg.model.source)
    from pipeline.model.build import OLMOE_1B_7B

    tiers = resolve_tiers(cfg, shape.experts, shape.k_max)
    with pytest.raises(ConfigError, match=r"federation.placement=queue: tier 't2' does not fit .* group 0"):
        Placement.for_run(cfg, plan_layout(cfg, 8), OLMOE_1B_7B, tiers,
                          assign_tiers(cfg.federation.clients, tiers, cfg.seed))
    Placement.for_run(_cfg("federation.placement=queue"), plan_layout(cfg, 8), OLMOE_1B_7B, tiers,
                      assign_tiers(cfg.federation.clients, tiers, cfg.seed))  # every tier fits at 80 GiB


def test_queue_hands_out_the_costliest_tier_first_and_records_where_clients_trained():
    from pipeline.plan.utilisation import planned_placement

    cfg = _cfg("federation.placement=queue")
    shape = model_shape(cfg.model.source)
    layout = plan_layout(cfg, 8)
    placement = planned_placement(cfg, layout, shape, "queue")
    clients = list(range(cfg.federation.clients))
    order = placement.queue_order(clients)
    costs = [placement.costs[placement.client_tiers[c]] for c in order]
    assert sorted(order) == clients and costs == sorted(costs, reverse=True)
    placement.assign(clients)  # the balanced plan is the queue's prediction
    predicted = placement.current.predicted
    trained_on = {c: c % len(layout.groups) for c in clients}
    placed = placement.observe({c: 1.0 for c in clients}, 10.0, trained_on)
    assert placed["mode"] == "queue" and placed["predicted_seconds"] == predicted
    assert placed["groups"] == [[c for c in clients if c % len(layout.groups) == g] for g in range(len(layout.groups))]
