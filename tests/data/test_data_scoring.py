"""evaluate_choices against a toy LM whose next-token preferences are set by hand.

The toy model's logits at a position depend only on the token there (a bigram table), so
every option's log-likelihood can be computed independently here with plain math.
"""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from pipeline.data import Example, build_word_tokenizer
from pipeline.eval.scoring import evaluate_choices, option_scores

WORDS = "is 3 + 4 even or odd ? pick red blue green dark light".split()
TOK = build_word_tokenizer(WORDS)


class BigramLM(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.modes_seen = []

    def forward(self, input_ids, attention_mask=None):
        self.modes_seen.append(self.training)
        return SimpleNamespace(logits=self.table[input_ids])


def ids(text, special=False):
    return TOK(text, add_special_tokens=special)["input_ids"]


def expected_score(table, prompt, option):
    """Sum of log p(option token | previous token) under the bigram table, by hand."""
    seq = ids(prompt, special=True) + ids(" " + option)
    n_opt = len(ids(" " + option))
    total = 0.0
    for pos in range(len(seq) - n_opt, len(seq)):
        row = table[seq[pos - 1]].tolist()
        log_z = math.log(sum(math.exp(v) for v in row))
        total += row[seq[pos]] - log_z
    return total


def random_examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(Example(f"is {rng.choice('34')} + 4 even or odd ?", ("even", "odd"), rng.randrange(2), "parity"))
        else:
            # Multi-token options take the one-sequence-per-option path.
            opts = ("red", "dark blue", "light green")
            out.append(Example("pick", opts, rng.randrange(3), "colors"))
    return out


def test_scores_match_hand_computation_on_both_paths():
    torch.manual_seed(0)
    table = torch.randn(len(TOK), len(TOK))
    model = BigramLM(table)
    exs = random_examples(12)
    got = option_scores(model, TOK, exs, batch_size=5)
    for ex, row in zip(exs, got):
        for opt, score in zip(ex.options, row):
            assert score == pytest.approx(expected_score(table, ex.prompt, opt), abs=1e-4)


def test_accuracy_and_loss_follow_the_preferences_we_set():
    table = torch.zeros(len(TOK), len(TOK))
    q = TOK.convert_tokens_to_ids("?")
    table[q, TOK.convert_tokens_to_ids("odd")] = 5.0  # after "?" the model always says odd
    pick = TOK.convert_tokens_to_ids("pick")
    table[pick, TOK.convert_tokens_to_ids("red")] = 5.0  # after "pick": red
    model = BigramLM(table)
    exs = [
        Example("is 3 + 4 even or odd ?", ("even", "odd"), 1, "parity"),
        Example("is 4 + 4 even or odd ?", ("even", "odd"), 0, "parity"),
        Example("is 3 + 3 even or odd ?", ("odd", "even"), 0, "parity"),
        Example("pick", ("blue", "red"), 1, "colors"),
    ]
    res = evaluate_choices(model, TOK, exs)
    assert res["n"] == 4
    assert res["accuracy"] == pytest.approx(3 / 4)
    assert res["per_family"] == {"colors": 1.0, "parity": pytest.approx(2 / 3)}
    gold_nll = [-expected_score(table, ex.prompt, ex.options[ex.answer]) for ex in exs]
    assert res["loss"] == pytest.approx(sum(gold_nll) / 4, abs=1e-5)


def test_ties_go_to_the_first_option_and_batching_does_not_matter():
    model = BigramLM(torch.zeros(len(TOK), len(TOK)))  # every option equally likely
    exs = [Example("is 3 + 4 even or odd ?", ("even", "odd"), a, "parity") for a in (0, 1, 0)]
    assert evaluate_choices(model, TOK, exs)["accuracy"] == pytest.approx(2 / 3)
    torch.manual_seed(1)
    model = BigramLM(torch.randn(len(TOK), len(TOK)))
    exs = random_examples(30, seed=3)
    a = evaluate_choices(model, TOK, exs, batch_size=1)
    b = evaluate_choices(model, TOK, exs, batch_size=64)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_runs_in_eval_mode_without_grad_and_restores_training_mode():
    model = BigramLM(torch.zeros(len(TOK), len(TOK)))
    model.train()
    evaluate_choices(model, TOK, random_examples(4))
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training
    model.eval()
    evaluate_choices(model, TOK, random_examples(4))
    assert not model.training
    assert model.table.grad is None


def test_no_examples_is_an_error():
    with pytest.raises(ValueError):
        evaluate_choices(BigramLM(torch.zeros(len(TOK), len(TOK))), TOK, [])
