"""The offline suite: deterministic, disjoint, well-formed, one-token answers."""

import random
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data import FAMILIES, FAMILY_CHANCE, Example, build_benchmark, load_tokenizer
from pipeline.data.tasks import CATEGORIES, LETTERS, WORD_CATEGORY, generate_family, pretraining_line

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-olmoe"


def test_same_seed_same_examples_other_seed_different():
    a = build_benchmark(3, 40, 20)
    assert a == build_benchmark(3, 40, 20)
    b = build_benchmark(4, 40, 20)
    assert a[0] != b[0] and a[1] != b[1]


def test_train_and_eval_prompts_are_disjoint_even_across_seeds():
    train0, eval0 = build_benchmark(0, 300, 100)
    train1, _ = build_benchmark(1, 300, 0)
    eval_prompts = {ex.prompt for ex in eval0}
    assert not eval_prompts & {ex.prompt for ex in train0}
    assert not eval_prompts & {ex.prompt for ex in train1}
    assert len(eval_prompts) == len(eval0)  # no repeats inside eval


def test_every_family_present_with_requested_counts():
    train, evals = build_benchmark(0, 10, 7)
    assert Counter(ex.family for ex in train) == {f: 10 for f in FAMILIES}
    assert Counter(ex.family for ex in evals) == {f: 7 for f in FAMILIES}
    assert [ex.family for ex in train[: len(FAMILIES)]] == list(FAMILIES)  # interleaved
    assert 6 <= len(FAMILIES) <= 10 and set(FAMILY_CHANCE) == set(FAMILIES)


def test_answers_in_range_and_options_distinct():
    train, evals = build_benchmark(0, 50, 50)
    for ex in train + evals:
        assert isinstance(ex, Example)
        assert 2 <= len(ex.options) <= 4
        assert 0 <= ex.answer < len(ex.options)
        assert len(set(ex.options)) == len(ex.options)
        assert FAMILY_CHANCE[ex.family] == pytest.approx(1 / len(ex.options))


def test_gold_answers_are_correct():
    _, evals = build_benchmark(5, 0, 40)
    for ex in evals:
        gold = ex.options[ex.answer]
        words = ex.prompt.split()
        if ex.family == "largest":
            assert int(gold) == max(int(w) for w in words if w.isdigit())
        elif ex.family == "smallest":
            assert int(gold) == min(int(w) for w in words if w.isdigit())
        elif ex.family == "next":
            seq = [int(w) for w in words if w.lstrip("-").isdigit()]
            assert int(gold) == seq[-1] + (seq[1] - seq[0])
        elif ex.family == "last":
            assert gold == words[words.index(".") - 1]
        elif ex.family == "category":
            assert gold in CATEGORIES[words[4]]
        elif ex.family == "samekind":
            cats = [WORD_CATEGORY[o] for o in ex.options]
            assert cats[ex.answer] == WORD_CATEGORY[words[3]] and len(set(cats)) == 4
        elif ex.family == "count":
            assert int(gold) == sum(w in LETTERS for w in words[4:-1])
        elif ex.family == "parity":
            assert int(gold) % 2 == ("even", "odd").index(words[2])
            assert int(ex.options[1 - ex.answer]) % 2 != int(gold) % 2
        else:
            raise AssertionError(f"family {ex.family} has no check")


def test_answer_positions_are_balanced():
    _, evals = build_benchmark(0, 0, 400)
    for fam in FAMILIES:
        answers = Counter(ex.answer for ex in evals if ex.family == fam)
        n_opt = len(next(ex for ex in evals if ex.family == fam).options)
        for j in range(n_opt):
            assert answers[j] / 400 > 0.6 / n_opt, (fam, answers)


def test_every_answer_is_one_token_and_nothing_is_unknown_under_the_shipped_tokenizer():
    tok = load_tokenizer(ASSET)
    train, evals = build_benchmark(0, 100, 100)
    for ex in train + evals:
        assert tok.unk_token_id not in tok(ex.prompt)["input_ids"], ex.prompt
        for opt in ex.options:
            assert len(tok(" " + opt, add_special_tokens=False)["input_ids"]) == 1, (ex.family, opt)
    rng = random.Random(0)
    for _ in range(500):
        assert tok.unk_token_id not in tok(pretraining_line(rng))["input_ids"]


def test_unknown_family_and_bad_side_are_refused():
    with pytest.raises(ValueError, match="unknown family"):
        generate_family("nope", 3, 0, "train")
    with pytest.raises(ValueError, match="side"):
        generate_family("parity", 3, 0, "test")
