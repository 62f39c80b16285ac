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
