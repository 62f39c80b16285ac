"""Merged Hugging Face model and peft adapter (attention and expert LoRA), reloaded by the libraries themselves."""
import copy
import json

import pytest
import torch
from transformers import OlmoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from pipeline.model import (adapter_parameters, adapter_state, is_expert_adapter, load_adapter_state,
                            merge_adapters, patch_olmoe, save_merged, set_lora_rank, set_top_k)
from pipeline.model.peft_format import (AdapterMismatch, adapter_state_at_scale, check_fits,
                                        read_peft_adapter, save_peft_adapter)


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


@pytest.mark.parametrize("experts", [False, True])
def test_peft_export_loads_with_peft(tiny_olmoe, tmp_path, experts):
    """Attention LoRA through target_modules, expert LoRA through target_parameters on the fused
    experts: plain peft on the plain model gives the patched model's logits, at its active rank."""
    from peft import PeftModel

    plain = copy.deepcopy(tiny_olmoe)
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model, seed=1, experts=experts)
    set_lora_rank(model, 3)  # exported at the active rank: scale alpha / 3
    save_peft_adapter(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == pytest.approx(8.0) and config["peft_type"] == "LORA"
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]

    peft_model = PeftModel.from_pretrained(plain, tmp_path / "peft")
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter did load and matter
        assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-3)


def test_peft_adapter_reads_back_into_our_layout(tiny_olmoe, tmp_path):
    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model, seed=3)
    set_top_k(model, 2)
    save_peft_adapter(model, tmp_path / "peft")
    adapter = read_peft_adapter(tmp_path / "peft")
    check_fits(adapter, model, "test")
    state = adapter_state_at_scale(adapter, 2.0)  # the model's own scale: bitwise the same
    assert all(torch.equal(state[k], v) for k, v in adapter_state(model).items())
    halved = adapter_state_at_scale(adapter, 4.0)  # twice the scale: B halved, the product kept
    assert torch.equal(halved["model.layers.0.mlp.lora_down_B"], state["model.layers.0.mlp.lora_down_B"] / 2)
    assert torch.equal(halved["model.layers.0.mlp.lora_down_A"], state["model.layers.0.mlp.lora_down_A"])

    other = patch_olmoe(copy.deepcopy(merge_adapters(model)), lora_rank=2)
    with pytest.raises(AdapterMismatch, match="rank 4"):
        check_fits(adapter, other, "model.init_adapter")


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


def test_peft_adapter_on_a_saved_base_with_its_delta(tiny_olmoe, tmp_path):
    """A merge-into-backbone method's export: the changed base (no LoRA) saved as a plain model,
    the adapter loaded onto it by peft, at a lower top-k written to the base's config."""
    from peft import PeftModel

    from pipeline.model import set_base_delta
    from pipeline.model.base_delta import lora_base_weights

    model = patch_olmoe(tiny_olmoe, lora_rank=4, lora_alpha=8.0)
    _nonzero_adapters(model, seed=4)
    gen = torch.Generator().manual_seed(5)
    set_base_delta(model, {k: torch.randn(w.shape, generator=gen) * 0.05 for k, w in lora_base_weights(model).items()})
    set_top_k(model, 2)
    save_merged(model, tmp_path / "base", lora=False)
    save_peft_adapter(model, tmp_path / "peft", base_model=str(tmp_path / "base"))
    assert json.loads((tmp_path / "base" / "config.json").read_text())["num_experts_per_tok"] == 2

    peft_model = PeftModel.from_pretrained(OlmoeForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        with peft_model.disable_adapter():  # the base alone is the delta without the LoRA
            without = peft_model(input_ids=ids).logits
    load_adapter_state(model, {k: torch.zeros_like(v) for k, v in adapter_state(model).items()})
    with torch.no_grad():
        torch.testing.assert_close(without, model(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(without, expected, atol=1e-3)
