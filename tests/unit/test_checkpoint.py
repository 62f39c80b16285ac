import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from pipeline import checkpoint
from pipeline.errors import RetryableError, UserError


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
    shards = checkpoint.expert_shard_files(tmp_path)
    assert [(a, b) for a, b, _ in shards] == [(0, 2), (2, 6), (6, 8)]
    checkpoint.join_expert_shard_files(tmp_path / "joined.safetensors", rest, shards)
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


# ---------------------------------------------------------------------------------------------
# Manifests, damage and fall-back (docs/reliability.md)

META = {"strategy": {}, "metrics_offset": 0, "algorithm": "smoe"}


def _save_run(run, rounds=(1, 2), shards=False):
    for r in rounds:
        tensors = {"adapters/a": torch.full((3,), float(r)), "adapters/b": torch.arange(4.0) * r}
        if shards:  # expert rows staged by the shard writers, as under expert-sharded aggregation
            staging = checkpoint.staging_dir(run, r)
            checkpoint.clear_dir(staging)
            for start, stop in ((0, 4), (4, 8)):
                checkpoint.save_expert_shard(staging, {k: v[start:stop] for k, v in _expert_tensors(r).items()},
                                             start, stop)
        checkpoint.save_checkpoint(run, r, tensors, {**META, "metrics_offset": 10 * r}, staged=shards)
    return run / "checkpoints"


def test_manifest_lists_every_file_and_an_intact_checkpoint_passes(tmp_path):
    root = _save_run(tmp_path, shards=True)
    manifest = json.loads((root / "round-000002" / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["experts-00000-00004.safetensors", "experts-00004-00008.safetensors",
                                "state.json", "state.safetensors"]
    assert manifest["state.safetensors"]["tensors"] == ["adapters/a", "adapters/b"]
    assert manifest["state.json"]["size"] == (root / "round-000002" / "state.json").stat().st_size
    assert checkpoint.damage(root / "round-000002") is None
    warnings = []
    assert checkpoint.verified_checkpoint(tmp_path, warnings.append, "") == root / "round-000002"
    assert warnings == []


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _drop_tensor(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors["adapters/b"]
    save_file(tensors, path)


def _retype_round(path):
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "round": "2"}))


def _flip_last_byte(path):  # same size, header intact: only the checksum can tell
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, corrupt, reason", [
    ("state.safetensors", _truncate, "state.safetensors: truncated"),
    ("state.safetensors", _drop_tensor, "state.safetensors: tensor 'adapters/b' missing"),
    ("state.json", _retype_round, "state.json: 'round' is \"2\", expected an integer"),
    ("state.safetensors", _flip_last_byte, "state.safetensors: checksum differs from the manifest"),
    ("experts-00004-00008.safetensors", _truncate, "experts-00004-00008.safetensors: truncated"),
    ("manifest.json", lambda p: p.write_text("{"), "manifest.json: unreadable"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, file, corrupt, reason):
    root = _save_run(tmp_path, shards=True)
    corrupt(root / "round-000002" / file)
    warnings = []
    chosen = checkpoint.verified_checkpoint(tmp_path, warnings.append, "")
    assert chosen == root / "round-000001"
    assert len(warnings) == 1, warnings  # one line: which checkpoint, why, and what is used instead
    assert warnings[0].startswith(f"{root / 'round-000002'} is damaged ({reason}")
    assert warnings[0].endswith("); using round-000001")
    tensors, meta = checkpoint.load_checkpoint(chosen)
    assert meta["round"] == 1 and torch.equal(tensors["adapters/a"], torch.full((3,), 1.0))


def test_no_intact_checkpoint_is_a_user_error_naming_each(tmp_path):
    root = _save_run(tmp_path)
    _truncate(root / "round-000002" / "state.safetensors")
    (root / "round-000001" / "state.json").unlink()
    with pytest.raises(UserError) as exc:
        checkpoint.verified_checkpoint(tmp_path, lambda line: None, "start again")
    message = str(exc.value)
    assert "round-000002: state.safetensors: truncated" in message
    assert "round-000001: state.json: missing" in message and message.endswith("start again")
    assert checkpoint.verified_checkpoint(tmp_path / "empty", lambda line: None, "") is None  # no checkpoint


def test_checkpoint_without_manifest_is_still_read_and_checked(tmp_path):
    root = _save_run(tmp_path)
    for r in (1, 2):  # as written before manifests existed
        (root / f"round-00000{r}" / "manifest.json").unlink()
    assert checkpoint.verified_checkpoint(tmp_path, lambda line: None, "") == root / "round-000002"
    _retype_round(root / "round-000002" / "state.json")
    assert checkpoint.damage(root / "round-000002") == "state.json: 'round' is \"2\", expected an integer"
    assert checkpoint.verified_checkpoint(tmp_path, lambda line: None, "") == root / "round-000001"


@pytest.mark.parametrize("error, kind, advice", [
    (OSError(errno.ENOSPC, "No space left on device"), UserError, "free disk space, then `fedmoe resume"),
    (SafetensorError("I/O error: No space left on device (os error 28)"), UserError, "free disk space"),
    (OSError(errno.EIO, "Input/output error"), RetryableError, "resume again with `fedmoe resume"),
])
def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error, kind, advice):
    root = _save_run(tmp_path, rounds=(1,))

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a full disk leaves behind
        raise error

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(kind) as exc:
        _save_run(tmp_path, rounds=(2,))
    message = str(exc.value)
    assert "\n" not in message and "round-000002" in message and advice in message
    assert "the previous checkpoint round-000001 is intact" in message
    assert ("resume again" in message) == (kind is RetryableError)  # only what may pass on retry says so
    assert sorted(p.name for p in root.iterdir()) == ["latest", "round-000001"]  # staging removed
    assert checkpoint.verified_checkpoint(tmp_path, lambda line: None, "") == root / "round-000001"
