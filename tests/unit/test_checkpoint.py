import json

import torch

from pipeline import checkpoint


def _save(run, r, value, keep=2):
    return checkpoint.save_checkpoint(run, r, {"a": torch.full((3,), float(value))}, {"x": r}, keep=keep)


def test_roundtrip_latest_and_pruning(tmp_path):
    for r in range(4):
        _save(tmp_path, r, r)
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "round-000003"
    tensors, meta = checkpoint.load_checkpoint(latest)
    assert torch.equal(tensors["a"], torch.full((3,), 3.0)) and meta == {"round": 3, "x": 3}
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-000002", "round-000003"]


def test_torn_checkpoint_is_never_picked(tmp_path):
    _save(tmp_path, 1, 1)
    root = tmp_path / "checkpoints"
    # A writer killed mid-way leaves a temp dir, or a round dir without state.json, and may
    # even have pointed `latest` at it: none of it is trusted.
    (root / ".tmp-round-000002-999").mkdir()
    torn = root / "round-000003"
    torn.mkdir()
    (torn / "state.safetensors").write_bytes(b"garbage")
    (root / "latest").write_text("round-000003\n")
    assert checkpoint.latest_checkpoint(tmp_path).name == "round-000001"


def test_latest_pointer_missing_falls_back_to_highest_complete(tmp_path):
    _save(tmp_path, 1, 1)
    _save(tmp_path, 2, 2)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint.latest_checkpoint(tmp_path).name == "round-000002"
    assert json.loads((tmp_path / "checkpoints" / "round-000002" / "state.json").read_text())["round"] == 2


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None


def _expert_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"adapters/layers.0.mlp.lora_down_A": torch.randn(8, 2, 3, generator=gen),
            "adapters/layers.0.mlp.lora_down_B": torch.randn(8, 5, 2, generator=gen).to(torch.bfloat16)}


def test_expert_shards_join_into_the_whole_file_and_read_back_by_rows(tmp_path):
    from safetensors.torch import load_file, save_file

    whole = _expert_tensors(0)
    rest = {"adapters/layers.0.self_attn.q_proj.lora_A": torch.randn(2, 4), "weight": torch.tensor([3.0])}
    for start, stop in ((0, 2), (2, 6), (6, 8)):  # uneven shards, written out of order
        checkpoint.save_expert_shard(tmp_path, {k: v[start:stop] for k, v in whole.items()}, start, stop)
    shards = checkpoint.expert_shards(tmp_path)
    assert [(a, b) for a, b, _ in shards] == [(0, 2), (2, 6), (6, 8)]
    checkpoint.join_expert_shards(tmp_path / "joined.safetensors", rest, shards)
    save_file({**whole, **rest}, str(tmp_path / "reference.safetensors"))
    joined, reference = (load_file(tmp_path / f"{n}.safetensors") for n in ("joined", "reference"))
    assert joined.keys() == reference.keys()
    for k in reference:
        assert joined[k].dtype == reference[k].dtype and torch.equal(joined[k], reference[k]), k
    rows = checkpoint.read_expert_rows(shards, (1, 7))  # spans all three shards
    assert all(torch.equal(rows[k], whole[k][1:7]) for k in whole)


def test_a_sharded_checkpoint_loads_whole_or_by_expert_rows(tmp_path):
    whole = _expert_tensors(1)
    staging = checkpoint.staging_dir(tmp_path, 4)
    checkpoint.clear_dir(staging)
    for start, stop in ((0, 4), (4, 8)):
        checkpoint.save_expert_shard(staging, {k: v[start:stop] for k, v in whole.items()}, start, stop)
    checkpoint.save_checkpoint(tmp_path, 4, {"weight": torch.tensor([2.0])}, {"x": 1}, staged=True)
    latest = checkpoint.latest_checkpoint(tmp_path)
    tensors, meta = checkpoint.load_checkpoint(latest)
    assert meta == {"round": 4, "x": 1} and set(tensors) == {"weight", *whole}
    assert all(torch.equal(tensors[k], whole[k]) for k in whole)
    mine, _ = checkpoint.load_checkpoint(latest, expert_range=(4, 8))
    assert all(torch.equal(mine[k], whole[k][4:]) for k in whole) and torch.equal(mine["weight"], tensors["weight"])
