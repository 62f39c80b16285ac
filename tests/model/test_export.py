"""Merged Hugging Face model and peft attention adapter, reloaded by the libraries themselves."""
import copy
import json

import pytest
import torch
from transformers import OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from pipeline.model import (adapter_parameters, adapter_state, export_peft_attention,
                            is_expert_adapter, load_adapter_state, merge_adapters, patch_olmoe,
                            save_merged, set_lora_rank)


def _nonzero_adapters(model, seed=0, std=0.1, experts=True):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in adapter_state(model).items():
        value = torch.randn(v.shape, generator=gen) * std
        state[k] = value if experts or not is_expert_adapter(k) else torch.zeros_like(v)
    load_adapter_state(model, state)


def test_merge_and_save_reload_same_logits(tiny_olmoe, tmp_path):
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model)
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    before = adapter_state(model)

    merged = merge_adapters(model)
    assert isinstance(merged.model.layers[0].mlp, OlmoeSparseMoeBlock)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not adapter_parameters(merged)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())  # input unchanged

    save_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    reloaded = OlmoeForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        # The patched model itself still runs with its adapters.
        torch.testing.assert_close(model(ids).logits, expected)


def test_merge_at_active_rank(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model, seed=2)
    set_lora_rank(model, 2)
    ids = torch.randint(1, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(merge_adapters(model)(ids).logits, model(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_peft_attention_export_loads_with_peft(tiny_olmoe, tmp_path):
    from peft import PeftModel

    plain = copy.deepcopy(tiny_olmoe)
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model, seed=1, experts=False)
    export_peft_attention(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"

    peft_model = PeftModel.from_pretrained(plain, tmp_path / "peft")
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter did load and matter
        assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-3)


def test_merge_warns_about_routing_variants(tiny_olmoe):
    model = patch_olmoe(tiny_olmoe, lora_rank=2)
    with torch.no_grad():
        model.model.layers[0].mlp.phi = torch.nn.Parameter(torch.full((8,), 0.5))
        model.model.layers[0].mlp.n_candidates = 8
    with pytest.warns(UserWarning, match="phi"):
        merge_adapters(model)


def test_load_model_from_local_dir(tiny_olmoe, tmp_path):
    from pipeline.model import load_model

    tiny_olmoe.save_pretrained(tmp_path / "base")
    loaded = load_model(str(tmp_path / "base"), dtype=torch.bfloat16)
    assert isinstance(loaded, OlmoeForCausalLM) and loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.model.layers[0].mlp.gate.weight.float(),
                               tiny_olmoe.model.layers[0].mlp.gate.weight.bfloat16().float())
