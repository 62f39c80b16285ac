"""`fedmoe export` (peft and merged), `fedmoe eval --model [--adapter]` and `model.init_adapter`
on the shared finished tiny run (smoe: tiers low at top-k 2 and high at top-k 8, LoRA rank 4)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from tests.conftest import run_here, set_args
from tests.e2e.conftest import TINY

pytestmark = pytest.mark.slow

# Plain transformers + peft, no fedmoe: the base at each top-k, the adapter on it, the logits of
# the recorded batches. Run in a fresh interpreter that never imports `pipeline`.
PLAIN_PEFT = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from peft import PeftModel

adapter, batches, out = sys.argv[1], sys.argv[2], sys.argv[3]
info = json.load(open(f"{adapter}/export.json"))
config = json.load(open(f"{adapter}/adapter_config.json"))
base = config["base_model_name_or_path"]
inputs = load_file(batches)
logits = {}
for k in map(int, sys.argv[4:]):
    model = AutoModelForCausalLM.from_pretrained(base, config=AutoConfig.from_pretrained(base, num_experts_per_tok=k))
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        for i in range(len(inputs) // 2):
            logits[f"{k}/{i}"] = model(input_ids=inputs[f"ids/{i}"], attention_mask=inputs[f"mask/{i}"]).logits
save_file(logits, out)
assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "fedmoe was imported"
print("exported top-k", info["top_k"])
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The run was made with one thread; the same count here makes its numbers comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_evals(run) -> dict[str, dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(e["round"] for e in events if e["event"] == "eval")
    return {e["tier"]: e for e in events if e["event"] == "eval" and e["round"] == last}


def _evals_at(run, round_) -> dict[str, dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["tier"]: e for e in events if e["event"] == "eval" and e["round"] == round_}


@pytest.fixture(scope="module")
def peft_export(finished_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "peft"
    assert main(["export", str(finished_run), "--format", "peft", "--tier", "low", "--out", str(out)]) == 0
    return out


class _Recorder(torch.nn.Module):
    """fedmoe's model, keeping every batch the scorer sends and the logits it got."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        self.calls.append((input_ids, attention_mask, logits))
        return type("Out", (), {"logits": logits})


class _Replay(torch.nn.Module):
    """Hands the scorer the plain peft model's logits, batch by batch."""

    def __init__(self, logits):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the scorer reads the device from it
        self.logits = iter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": next(self.logits)})


def _fedmoe_side(run: Path, tier_name: str):
    """The run's final model placed as the export places it, and its data."""
    from pipeline import checkpoint
    from pipeline.federation import restore, rundir
    from pipeline.federation.assembly import setup
    from pipeline.federation.export_run import export_setting, place_model

    cfg = rundir.run_config(run)
    model, tokenizer, tiers, strategy, data = setup(cfg)
    tensors, meta = checkpoint.load_checkpoint(restore.choose(run, False, ""))
    strategy.load_state_dict({"tensors": tensors, "meta": meta["strategy"]})
    tier = next(t for t in tiers if t.name == tier_name)
    adapters, setting = export_setting(strategy, tier, 8, cfg.model.lora.rank)
    place_model(model, strategy, adapters, setting)
    return model, tiers, data, cfg


def test_peft_export_loads_in_plain_peft_with_the_runs_accuracy(finished_run, peft_export, tmp_path):
    from pipeline.eval.scoring import evaluate_choices
    from pipeline.model import ModelSetting, adapter_state, apply_setting, load_adapter_state

    config = json.loads((peft_export / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    card = (peft_export / "README.md").read_text()
    info = json.loads((peft_export / "export.json").read_text())
    assert info["top_k"] == 2 and info["tier"] == "low" and "num_experts_per_tok=2" in card
    final = _final_evals(finished_run)
    assert f"{100 * final['high']['accuracy']:.1f}" in card and "fedmoe export" in card

    model, tiers, data, cfg = _fedmoe_side(finished_run, "low")
    recorded, ours = {}, {}
    for tier in tiers:
        apply_setting(model, ModelSetting(tier.top_k, cfg.model.lora.rank))
        recorder = _Recorder(model)
        ours[tier.name] = evaluate_choices(recorder, data.tokenizer, data.eval_examples, cfg.eval.batch_size)
        recorded[tier.top_k] = recorder.calls
    batches = {}
    for i, (ids, mask, _) in enumerate(recorded[2]):
        batches[f"ids/{i}"], batches[f"mask/{i}"] = ids, mask
    assert all(torch.equal(a[0], b[0]) for a, b in zip(recorded[2], recorded[8]))  # same batches at each k
    save_file(batches, str(tmp_path / "batches.safetensors"))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(peft_export), str(tmp_path / "batches.safetensors"),
                           str(tmp_path / "plain.safetensors"), "2", "8"], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = load_file(str(tmp_path / "plain.safetensors"))

    for tier in tiers:
        k = tier.top_k
        got = []
        for i, (_, mask, logits) in enumerate(recorded[k]):
            theirs = plain[f"{k}/{i}"]
            real = mask.bool()  # fedmoe routes no pad; the plain model does, which no real token sees
            torch.testing.assert_close(theirs[real], logits[real], atol=1e-5, rtol=1e-5)
            got.append(theirs)
        scored = evaluate_choices(_Replay(got), data.tokenizer, data.eval_examples, cfg.eval.batch_size)
        assert scored["accuracy"] == ours[tier.name]["accuracy"] == final[tier.name]["accuracy"]
        assert scored["loss"] == pytest.approx(final[tier.name]["loss"], abs=1e-5)
        assert ours[tier.name]["loss"] == final[tier.name]["loss"]  # fedmoe's side is the run's own evaluation
    # The adapter matters: the base model alone gives other logits.
    load_adapter_state(model, {k: torch.zeros_like(v) for k, v in adapter_state(model).items()})
    apply_setting(model, ModelSetting(2, cfg.model.lora.rank))
    ids, mask, logits = recorded[2][0]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                  logits[mask.bool()], atol=1e-4)


def test_a_run_started_from_the_adapter_begins_where_the_source_ended(finished_run, peft_export, tmp_path):
    out = tmp_path / "from-adapter"
    run_here("run", "--config", TINY, "--out", out,
           *set_args([f"model.init_adapter={peft_export}", "federation.rounds=1", "train.local_steps=1",
                      "federation.clients_per_round=1", "checkpoint.save_merged=false"]))
    start, final = _evals_at(out, 0), _final_evals(finished_run)
    assert start.keys() == final.keys()
    for tier in final:
        assert start[tier]["accuracy"] == final[tier]["accuracy"]
        assert start[tier]["loss"] == final[tier]["loss"]  # the same adapters, bit for bit
        assert start[tier]["per_family"] == final[tier]["per_family"]


def test_eval_model_on_the_merged_export_equals_the_runs_eval(finished_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["export", str(finished_run), "--format", "merged", "--out", str(merged)]) == 0
    assert (merged / "README.md").is_file() and (merged / "model.safetensors").is_file()
    assert json.loads((merged / "config.json").read_text())["num_experts_per_tok"] == 8
    assert main(["eval", "--model", str(merged), str(finished_run), "--json", str(tmp_path / "m.json")]) == 0
    rows = {r["tier"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    final = _final_evals(finished_run)
    assert rows.keys() == final.keys()
    for tier, want in final.items():
        assert rows[tier]["top_k"] == want["top_k"]
        assert rows[tier]["accuracy"] == want["accuracy"] and rows[tier]["per_family"] == want["per_family"]
        assert rows[tier]["loss"] == pytest.approx(want["loss"], abs=1e-5)  # merged: W + sBA rounds once more
    assert "merged" in capsys.readouterr().out


def _bad_adapter(peft_export: Path, where: Path, change) -> Path:
    where.mkdir()
    (where / "adapter_config.json").write_text((peft_export / "adapter_config.json").read_text())
    tensors = load_file(str(peft_export / "adapter_model.safetensors"))
    config = json.loads((where / "adapter_config.json").read_text())
    tensors, config = change(tensors, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(where / "adapter_model.safetensors"))
    (where / "adapter_config.json").write_text(json.dumps(config))
    return where


def _rank_two(tensors, config):
    cut = {}
    for k, v in tensors.items():
        if ".mlp.experts" in k:  # [E*r, in] and [out, r*E]: take 2 of each expert's 4 ranks
            cut[k] = (v.reshape(-1, 4, v.shape[-1])[:, :2].reshape(-1, v.shape[-1]) if "lora_A" in k
                      else v.reshape(v.shape[0], 4, -1)[:, :2].reshape(v.shape[0], -1))
        else:
            cut[k] = v[:2] if "lora_A" in k else v[:, :2]
    return cut, {**config, "r": 2}


def _lm_head_too(tensors, config):
    return ({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 128),
             "base_model.model.lm_head.lora_B.weight": torch.zeros(233, 4)}, config)


def _no_k_proj(tensors, config):
    return {k: v for k, v in tensors.items() if ".k_proj." not in k}, config


@pytest.mark.parametrize("change, message", [
    (_rank_two, "has LoRA rank 2, the model's LoRA has rank 4"),
    (_lm_head_too, "adapts 'lm_head'"),
    (_no_k_proj, "does not adapt 'model.layers.0.self_attn.k_proj'"),
    (None, "has no adapter_model.safetensors"),
])
def test_bad_init_adapter_is_one_line_and_exit_2(finished_run, peft_export, tmp_path, capsys, change, message):
    if change is None:
        bad = tmp_path / "half"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((peft_export / "adapter_config.json").read_text())
    else:
        bad = _bad_adapter(peft_export, tmp_path / "bad", change)
    out = tmp_path / "run"
    code = main(["run", "--config", str(TINY), "--out", str(out), "--set", f"model.init_adapter={bad}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "model.init_adapter" in err and message in err, err
    assert not out.exists()  # checked before anything was written


@pytest.mark.parametrize("args, message", [
    (["eval", "{run}", "--adapter", "{peft}"], "--adapter: only with --model"),
    (["eval", "--model", "{tmp}/nope", "{run}"], "--model {tmp}/nope: no such directory"),
    (["eval", "--model", "assets/tiny-olmoe", "--adapter", "{tmp}/nope", "{run}"], "--adapter: {tmp}/nope: no such directory"),
    (["eval", "--model", "assets/tiny-olmoe", "--adapter", "{tmp}/lm", "{run}"], "adapts 'lm_head'"),
    (["eval", "--model", "assets/tiny-olmoe", "--config", str(TINY), "{run}"], "--config/--set: not with a run directory"),
    (["export", "{run}", "--format", "onnx", "--out", "{tmp}/x"], "--format: must be peft or merged"),
    (["export", "{run}", "--format", "peft", "--tier", "mid", "--out", "{tmp}/x"], "has no tier 'mid' (its tiers: low, high)"),
    (["export", "{run}", "--format", "peft", "--out", "{tmp}/full"], "--out {tmp}/full: directory exists and is not empty"),
])
def test_bad_export_and_eval_flags_are_one_line_and_exit_2(finished_run, peft_export, tmp_path, capsys, args, message):
    _bad_adapter(peft_export, tmp_path / "lm", _lm_head_too)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fill = dict(run=finished_run, peft=peft_export, tmp=tmp_path)
    code = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.format(**fill) in err, err
    assert not (tmp_path / "x").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
