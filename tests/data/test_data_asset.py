"""The shipped tiny OLMoE loads offline and sits near chance on the suite."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.data import FAMILIES, FAMILY_CHANCE, build_benchmark, collate, load_tokenizer
from pipeline.eval.scoring import evaluate_choices

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-olmoe"


@pytest.fixture(scope="module")
def shipped():
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(ASSET, local_files_only=True)
    return model, load_tokenizer(ASSET)


def test_directory_is_small_and_complete():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 8.5 * 2**20


def test_loads_as_float32_olmoe_with_the_documented_shape(shipped):
    model, tok = shipped
    cfg = model.config
    assert cfg.model_type == "olmoe" and cfg.num_experts == 32 and cfg.num_experts_per_tok == 8
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id is None and cfg.pad_token_id == tok.pad_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")


def test_base_accuracy_is_near_chance_at_k8_and_k2(shipped):
    model, tok = shipped
    _, evals = build_benchmark(0, 0, 60)
    chance = sum(FAMILY_CHANCE[ex.family] for ex in evals) / len(evals)
    try:
        for k in (8, 2):
            for layer in model.model.layers:
                layer.mlp.gate.top_k = k
            res = evaluate_choices(model, tok, evals, batch_size=256)
            assert abs(res["accuracy"] - chance) < 0.06, (k, res)
    finally:
        for layer in model.model.layers:
            layer.mlp.gate.top_k = model.config.num_experts_per_tok


def test_recorded_base_accuracy_matches_the_families():
    acc = json.loads((ASSET / "base_accuracy.json").read_text())
    for k in ("8", "2"):
        per_family = acc["top_k"][k]["per_family"]
        assert set(per_family) == set(FAMILIES)
        assert abs(acc["top_k"][k]["accuracy"] - acc["chance"]) < 0.05


def test_answer_only_loss_runs_through_the_model(shipped):
    model, tok = shipped
    train, _ = build_benchmark(0, 2, 0)
    out = model(**collate(train, tok, max_length=64))
    assert torch.isfinite(out.loss) and 0.5 < out.loss.item() < 10
