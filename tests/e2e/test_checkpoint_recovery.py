"""Damaged checkpoints: `resume` and `eval` fall back to the previous intact one in one line;
a checkpoint that does not fit the run's config or holds NaN is exit 2; only errors that may
pass on retry (exit 1) say "resume again" (docs/reliability.md)."""
import errno
import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import checkpoint
from pipeline.cli import main
from pipeline.federation import commands, signals

pytestmark = pytest.mark.slow


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished tiny run (3 rounds, checkpoints round-000002 and round-000003)."""
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}  # resume installs its handlers
    yield shutil.copytree(finished_run, tmp_path / "run")
    for s, handler in saved.items():
        signal.signal(s, handler)


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_resume_falls_back_past_a_damaged_latest_checkpoint_and_ends_bitwise(run, finished_run, cli):
    latest = run / "checkpoints" / "round-000003"
    data = (latest / "state.safetensors").read_bytes()
    (latest / "state.safetensors").write_bytes(data[:len(data) // 3])
    shutil.rmtree(run / "final")
    _, _, err = cli("resume", run)
    lines = [x for x in err.splitlines() if x.startswith("fedmoe")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fedmoe: warning: {latest} is damaged (state.safetensors: truncated")
    assert lines[0].endswith("; using round-000002")
    resumed = [e for e in _events(run) if e["event"] == "run" and e["status"] == "resumed"]
    assert [e["round"] for e in resumed] == [3]  # round 3 trained again from round 2
    want = load_file(finished_run / "final" / "adapter.safetensors")
    got = load_file(run / "final" / "adapter.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert checkpoint.damage(latest) is None  # rewritten whole


def test_eval_falls_back_to_the_previous_checkpoint(run, tmp_path, capsys):
    state = run / "checkpoints" / "round-000003" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0x01  # one flipped bit: only the checksum notices
    state.write_bytes(bytes(data))
    assert main(["eval", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    err = capsys.readouterr().err
    assert err.strip() == (f"fedmoe: warning: {state.parent} is damaged (state.safetensors: checksum differs "
                           "from the manifest); using round-000002")
    rows = json.loads((tmp_path / "eval.json").read_text())
    logged = {e["tier"]: e["accuracy"] for e in _events(run) if e["event"] == "eval" and e["round"] == 2}
    assert {r["round"] for r in rows} == {2} and {r["tier"]: r["accuracy"] for r in rows} == logged


def test_no_intact_checkpoint_exits_2_and_changes_nothing(run, capsys):
    root = run / "checkpoints"
    meta = json.loads((root / "round-000003" / "state.json").read_text())
    (root / "round-000003" / "state.json").write_text(json.dumps({**meta, "metrics_offset": "many"}))
    (root / "round-000002" / "state.safetensors").unlink()
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["resume", str(run)]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"fedmoe: error: {root}: no intact checkpoint (round-000003: state.json: 'metrics_offset' "
                          "is \"many\", expected an integer; round-000002: state.safetensors: missing)")
    assert "--overwrite" in err and "resume again" not in err
    assert (run / "metrics.jsonl").read_bytes() == before


def _nan_checkpoint(run):
    """Round 3 as a run that saved NaN would have written it: the manifest matches."""
    latest = run / "checkpoints" / "round-000003"
    tensors = load_file(latest / "state.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, latest / "state.safetensors")
    (latest / "manifest.json").unlink()
    checkpoint.write_manifest(latest)
    return key


def test_permanent_errors_exit_2_and_retryable_ones_exit_1(run, capsys, monkeypatch):
    shutil.rmtree(run / "final")  # unfinished: resume would train
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("rank: 4", "rank: 8"))  # the user edits the LoRA rank
    assert main(["resume", str(run)]) == 2
    err = _one_line(capsys)
    assert f"has LoRA rank 4, but {config} has model.lora.rank: 8; set it back to 4" in err
    assert "resume again" not in err
    config.write_text(config.read_text().replace("rank: 8", "rank: 4"))
    key = _nan_checkpoint(run)
    assert main(["eval", str(run)]) == 2
    err = _one_line(capsys)
    assert f"round-000003: adapters/{key[len('adapters/'):]} holds NaN or Inf" in err and "resume again" not in err
    # An I/O error that may pass on retry, raised by the real checkpoint writer.
    def failing(tensors, filename, metadata=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "save_file", failing)
    monkeypatch.setattr(commands, "resume_run", lambda run_dir: checkpoint.save_checkpoint(
        run_dir, 4, {"adapters/x": torch.zeros(1)}, {"strategy": {}, "metrics_offset": 0, "algorithm": "smoe"}))
    assert main(["resume", str(run)]) == 1
    err = _one_line(capsys)
    assert err == (f"fedmoe: {run}/checkpoints/round-000004: Input/output error while writing this checkpoint; "
                   f"the previous checkpoint round-000003 is intact: resume again with `fedmoe resume {run}`")
