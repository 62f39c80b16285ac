import json
from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG, apply_override, config_from_dict, load_config, resolve_tiers
from pipeline.errors import ConfigError


def test_default_config_loads_with_four_tiers():
    cfg = load_config(DEFAULT_CONFIG)
    tiers = resolve_tiers(cfg, num_experts=32, k_max=8)
    assert [t.top_k for t in tiers] == [2, 4, 6, 8]
    assert [t.lora_rank for t in tiers] == [2, 4, 6, 8]
    assert cfg.seed == 0 and cfg.federation.rounds >= 1


def test_overrides_types_and_list_items():
    cfg = load_config(None, ["train.lr=1e-3", "federation.rounds=3", "tiers.0.top_k=3",
                             "algorithm.options={a: 1}", "logging.progress=false"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.federation.rounds == 3
    assert cfg.tiers[0].top_k == 3
    assert cfg.algorithm.options == {"a": 1}
    assert cfg.logging.progress is False


@pytest.mark.parametrize("override, field", [
    (["federation.rounds=-1"], "federation.rounds"),
    (["train.nope=1"], "train.nope"),
    (["nope=1"], "nope"),
    (["train.lr=fast"], "train.lr"),
    (["federation.rounds=2.5"], "federation.rounds"),
    (["tiers.0.budget=1.5"], "tiers.0.budget"),
    (["tiers.7.top_k=1"], "--set tiers.7"),
    (["federation.clients_per_round=99"], "federation.clients_per_round"),
    (["logging.progress=3"], "logging.progress"),
    (["train.precision=fp8"], "train.precision"),
    (["train.activation_checkpointing=sometimes"], "train.activation_checkpointing"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.zero_stage=3", "tiers.1.ranks=2", "tiers.1.ep_size=2"], "tiers.1.ep_size"),
    (["model.init_adapter=/no/such/adapter"], "model.init_adapter"),
    (["model.init_adapter=3"], "model.init_adapter"),
    (["model.init_adapter=assets/tiny-olmoe"], "model.init_adapter"),  # a directory, not a peft adapter
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value).startswith(field)


def test_top_k_above_expert_count_is_refused():
    cfg = load_config(None, ["tiers.3.top_k=64"])
    with pytest.raises(ConfigError, match=r"tiers\.3\.top_k: 64 exceeds the model's 32 experts"):
        resolve_tiers(cfg, num_experts=32, k_max=8)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="^train: expected a mapping"):
        config_from_dict({"train": 3, "tiers": [{"name": "a"}]})


def test_override_syntax():
    raw = {}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(raw, "train.lr")


@pytest.mark.parametrize("overrides, message", [
    (["tiers.0.ranks=4", "tiers.0.ep_size=3"], "tiers.0.ep_size: must be a divisor of tiers.0.ranks=4"),
    (["tiers.0.ep_size=0"], "tiers.0.ep_size: must be a divisor"),
    (["tiers.1.ep_size=2"], "tiers.1.ep_size: must be a divisor of tiers.1.ranks=1"),
])
def test_ep_size_must_divide_the_tiers_ranks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, overrides)


def test_ep_size_must_divide_the_expert_count():
    cfg = load_config(DEFAULT_CONFIG, ["tiers.0.ranks=6", "tiers.0.ep_size=3"])
    assert cfg.tiers[0].ep_size == 3
    with pytest.raises(ConfigError, match="tiers.0.ep_size: must divide the model's 32 experts, got 3"):
        resolve_tiers(cfg, num_experts=32, k_max=8)
    cfg = load_config(DEFAULT_CONFIG, ["tiers.0.ranks=4", "tiers.0.ep_size=4"])
    resolve_tiers(cfg, num_experts=32, k_max=8)


def test_memory_plan_counts_each_ranks_share_of_the_experts():
    from pipeline.plan.memory import model_shape, tier_memory

    shape = model_shape("assets/tiny-olmoe")
    experts = shape.layers * shape.experts * 3 * shape.hidden * shape.intermediate
    for zero in (0, 2):
        base = ["tiers.0.ranks=2", "model.source=assets/tiny-olmoe", f"deepspeed.zero_stage={zero}"]
        a, b = (tier_memory(shape, load_config(DEFAULT_CONFIG, base + extra), 0, 8, 2)
                for extra in ([], ["tiers.0.ep_size=2"]))
        assert a.frozen - b.frozen == pytest.approx(4 * experts / 2)  # fp32: half the experts
        assert b.adapters < a.adapters
        if zero == 0:  # unpartitioned states follow the local experts
            assert b.optimizer < a.optimizer and b.gradients < a.gradients
        else:  # ZeRO partitions every adapter's states over the group either way
            assert b.optimizer == a.optimizer and b.gradients == a.gradients


def test_activation_checkpointing_modes_decide_what_the_plan_counts_and_the_run_does():
    """A tier that fits its GPU only with checkpointing: `off` refuses it and names the option,
    `auto` plans it checkpointed (the run does so on a GPU, not on a CPU), `on` always."""
    from pipeline.errors import UserError
    from pipeline.federation.placement import Placement
    from pipeline.federation.topology import plan_layout
    from pipeline.plan.memory import GIB, HEADROOM, check_fits, model_shape, tier_memory

    shape = model_shape("assets/tiny-olmoe")
    base = ["model.source=assets/tiny-olmoe", "train.batch_size=64", "train.max_length=256"]
    top = resolve_tiers(load_config(DEFAULT_CONFIG, base), shape.experts, shape.k_max)[-1]
    row = tier_memory(shape, load_config(DEFAULT_CONFIG, base), top.index, top.top_k, 1)
    assert row.total_checkpointed < row.total
    between = (row.total + row.total_checkpointed) / 2 / HEADROOM / GIB  # GiB: fits only checkpointed
    model_config = json.loads(Path("assets/tiny-olmoe/config.json").read_text())
    for mode, checkpointed in (("off", False), ("auto", True), ("on", True)):
        cfg = load_config(DEFAULT_CONFIG, base + [f"train.activation_checkpointing={mode}",
                                                  f"tiers.{top.index}.gpu_memory_gb={between}"])
        row = tier_memory(shape, cfg, top.index, top.top_k, 1)
        assert (row.checkpointed, row.fits) == (checkpointed, checkpointed)
        if mode == "off":
            with pytest.raises(UserError, match="train.activation_checkpointing"):
                check_fits([row])
        tiers = resolve_tiers(cfg, shape.experts, shape.k_max)
        placement = Placement.for_run(cfg, plan_layout(cfg, 1), model_config, tiers, tiers)
        assert placement.checkpointing(top.index, 0, "cuda", mode) == checkpointed
        assert placement.checkpointing(top.index, 0, "cpu", mode) == (mode == "on")
        assert not placement.checkpointing(0, 0, "cuda", mode) or mode == "on"  # the lowest tier fits
    roomy = load_config(DEFAULT_CONFIG, base + ["train.activation_checkpointing=on"])
    assert tier_memory(shape, roomy, top.index, top.top_k, 1).checkpointed  # on: even where it fits without


def test_deepspeed_json_is_checked_for_a_group_of_several_ranks(tmp_path):
    """DeepSpeed parses the merged config before torch.distributed starts (a world of one), yet
    the generated batch keys are for the client group's ranks: a group of 2 must pass."""
    import json

    from pipeline.config import DeepSpeedConfig, TrainConfig
    from pipeline.engine.client import check_deepspeed_config
    from pipeline.errors import ConfigError

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for ranks in (1, 2, 4):
        check_deepspeed_config(TrainConfig(batch_size=8), DeepSpeedConfig(zero_stage=3, config=str(path)), ranks)
    path.write_text(json.dumps({"train_batch_size": 7}))
    with pytest.raises(ConfigError, match="train_batch_size 7"):
        check_deepspeed_config(TrainConfig(batch_size=8), DeepSpeedConfig(config=str(path)), 2)


def test_zero_buckets_are_sized_to_the_adapters_unless_the_json_sets_them(tmp_path):
    import json

    from pipeline.config import DeepSpeedConfig, TrainConfig
    from pipeline.engine.client import deepspeed_config

    zero = deepspeed_config(TrainConfig(), DeepSpeedConfig(zero_stage=2), 1, bucket_elements=1234)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 1234, "allgather_bucket_size": 1234}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 99}}))
    zero = deepspeed_config(TrainConfig(), DeepSpeedConfig(config=str(path)), 1, bucket_elements=1234)["zero_optimization"]
    assert zero == {"stage": 1, "reduce_bucket_size": 99, "allgather_bucket_size": 1234}
