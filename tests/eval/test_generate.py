"""Greedy generation with a KV cache against a cache-free loop, and generate-mode scoring, on a
small random OLMoE with our patched blocks."""
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data import Example, build_word_tokenizer
from pipeline.errors import ConfigError
from pipeline.eval.generate import evaluate_generate, greedy_generate
from pipeline.eval.modes import evaluate_examples
from pipeline.eval.scoring import evaluate_choices, option_scores
from pipeline.model import build_model, patch_olmoe, set_top_k
from tests.model.conftest import one_thread  # noqa: F401 - the same autouse fixture as tests/model

WORDS = [f"w{i}" for i in range(40)] + [str(i) for i in range(20)]  # 60 words + 3 specials < 64
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, max_position_embeddings=64,
              eos_token_id=None, pad_token_id=0)
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "3 4 5", "w12 w13", "w0 w39 1 2 w7"]


@pytest.fixture
def model():
    """Expert weights x5: at random init the residual stream swamps the experts, and then
    routing (top-k) would not change any prediction."""
    base = build_model(CONFIG, seed=0)
    with torch.no_grad():
        for layer in base.model.layers:
            for name, param in layer.mlp.named_parameters():
                if not name.startswith("gate."):
                    param.mul_(5.0)
    return patch_olmoe(base, lora_rank=2).eval()


@pytest.fixture
def tok():
    return build_word_tokenizer(WORDS)


@torch.no_grad()
def reference_tokens(model, tok, prompt, n, eos=None):
    """Greedy by hand: one prompt, no cache, the whole sequence recomputed every step."""
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


def test_batched_cached_generation_equals_the_cache_free_loop(model, tok):
    want = [tok.decode(reference_tokens(model, tok, p, 5), skip_special_tokens=True) for p in PROMPTS]
    assert len(set(want)) >= 4  # the prompts lead to different continuations
    for batch_size in (1, 4, 64):  # batches mix prompt lengths: left padding must not leak
        assert greedy_generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=batch_size) == want


def test_a_row_stops_at_eos(model, tok):
    first = reference_tokens(model, tok, PROMPTS[2], 1)[0]
    tok.eos_token = tok.convert_ids_to_tokens(first)  # the third prompt's first token is now EOS
    got = greedy_generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=4)
    want = [tok.decode(reference_tokens(model, tok, p, 5, eos=first), skip_special_tokens=True) for p in PROMPTS]
    assert got == want and got[2] == ""


def test_generate_mode_scores_extracted_answers(model, tok):
    texts = greedy_generate(model, tok, PROMPTS[:3], max_new_tokens=4)
    first = [t.split()[0] for t in texts]
    absent = [w for w in WORDS if all(w not in t.split() for t in texts)][:2]
    # One family per example, so each family's label set is that example's options.
    exs = [Example(PROMPTS[0], (first[0], absent[0]), 0, "right"),  # the generation names the gold
           Example(PROMPTS[1], (absent[0], first[1]), 0, "wrong"),  # names the other option
           Example(PROMPTS[2], tuple(absent), 0, "failure")]  # names no option: a format failure
    res = evaluate_generate(model, tok, exs, max_new_tokens=4)
    assert res["generations"] == texts
    assert res["accuracy"] == pytest.approx(1 / 3) and res["format_failures"] == pytest.approx(1 / 3)
    assert res["per_family"] == {"failure": 0.0, "right": 1.0, "wrong": 0.0}
    assert res["per_family_format_failures"] == {"failure": 1.0, "right": 0.0, "wrong": 0.0}
    assert res["loss"] is None
    assert evaluate_examples(model, tok, exs, "generate", max_new_tokens=4)["accuracy"] == res["accuracy"]


def test_choice_mode_is_evaluate_choices_with_no_format_failures(model, tok):
    exs = [Example(p, ("w1", "w2", "3"), i % 3, "f") for i, p in enumerate(PROMPTS)]
    got = evaluate_examples(model, tok, exs, "choice")
    assert got == {**evaluate_choices(model, tok, exs), "format_failures": 0.0}
    with pytest.raises(ValueError, match="sample"):
        evaluate_examples(model, tok, exs, "sample")


def test_fewer_experts_per_token_change_predictions(model, tok):
    """The capacity property on a small model: top-1 routing is not top-4 routing."""
    exs = [Example(p, tuple(WORDS[:8]), 0, "f") for p in PROMPTS]

    def predictions(k):
        set_top_k(model, k)
        scores = option_scores(model, tok, exs)
        return [max(range(len(row)), key=row.__getitem__) for row in scores], \
            greedy_generate(model, tok, PROMPTS, max_new_tokens=3)

    full_choice, full_text = predictions(4)
    low_choice, low_text = predictions(1)
    assert full_choice != low_choice and full_text != low_text
    assert predictions(4) == (full_choice, full_text)  # and back: evaluation is deterministic


@pytest.mark.parametrize("override, field", [({"mode": "sample"}, "eval.mode"),
                                             ({"max_new_tokens": 0}, "eval.max_new_tokens")])
def test_config_checks_the_eval_keys(override, field):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"tiers": [{"name": "t"}], "eval": override})
    assert config_from_dict({"tiers": [{"name": "t"}]}).eval.mode == "choice"  # the default


def test_tables_show_format_failures_in_generate_mode():
    from rich.console import Console

    from pipeline.eval.metrics import eval_tables, round_table

    rows = [{"tier": "low", "top_k": 2, "lora_rank": 8, "mode": "generate", "accuracy": 0.5, "loss": None,
             "format_failures": 0.25, "per_family": {"count": 0.75, "next": 0.125}},
            {"tier": "low", "top_k": 8, "lora_rank": 8, "mode": "generate", "accuracy": 0.625, "loss": None,
             "format_failures": 0.0, "per_family": {"count": 1.0, "next": 0.25}}]
    console = Console(record=True, width=120)
    console.print(round_table(rows[:1], None, 0.25))
    for table in eval_tables(rows, "title", 0.25):
        console.print(table)
    text = console.export_text()
    assert "format failures" in text and "25.00%" in text and "loss" not in text
    assert "low k=2" in text and "low k=8" in text
    count_row = next(line for line in text.splitlines() if "count" in line)
    assert "75.0" in count_row and "100.0" in count_row
