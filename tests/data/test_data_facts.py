"""The knowledge suite (`data.source: facts`): a seeded world, asked about in disjoint prompts."""

import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import FACT_FAMILIES, build_facts, load_tokenizer
from pipeline.data.facts import _RELATIONS, FACTS_PER_FAMILY, fact_table
from pipeline.errors import ConfigError
from pipeline.eval.compare import read_spec

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-olmoe"


def _subject(prompt: str, family: str) -> tuple[str, str]:
    """The two subject tokens, read back from the prompt by the family's template."""
    pattern = re.escape(_RELATIONS[family].template)
    for field, group in (("s0", r"(\S+)"), ("s1", r"(\S+)"), ("opts", r".+")):
        pattern = pattern.replace(re.escape("{" + field + "}"), group)
    match = re.fullmatch(pattern, prompt)
    assert match, prompt
    return match.group(1), match.group(2)


def test_same_seed_same_world_other_seed_other_world():
    a = build_facts(3, 30, 10)
    assert a == build_facts(3, 30, 10)
    assert build_facts(4, 30, 10) != a
    assert fact_table(3, "hue") != fact_table(4, "hue")


def test_every_prompt_asks_a_fact_and_its_gold_is_that_fact():
    train, evals = build_facts(0, 60, 60)
    assert Counter(e.family for e in train) == {f: 60 for f in FACT_FAMILIES}
    assert Counter(e.family for e in evals) == {f: 60 for f in FACT_FAMILIES}
    for ex in train + evals:
        table = fact_table(0, ex.family)
        assert ex.options[ex.answer] == table[_subject(ex.prompt, ex.family)]
        assert len(set(ex.options)) == len(ex.options) == 4
        assert all(o in ex.prompt for o in ex.options)  # listed, so generate mode can extract


def test_eval_prompts_are_distinct_and_never_trained_on_even_across_seeds():
    train0, eval0 = build_facts(0, 400, 100)
    train1, _ = build_facts(1, 400, 0)
    eval_prompts = {e.prompt for e in eval0}
    assert len(eval_prompts) == len(eval0)
    assert not eval_prompts & {e.prompt for e in train0 + train1}


def test_values_are_balanced_and_training_covers_every_fact():
    for family in FACT_FAMILIES:
        counts = Counter(fact_table(0, family).values())
        assert len(fact_table(0, family)) == FACTS_PER_FAMILY
        assert max(counts.values()) - min(counts.values()) <= 1, family
    train, _ = build_facts(0, 400, 0)
    for family in FACT_FAMILIES:
        asked = {_subject(e.prompt, family) for e in train if e.family == family}
        assert asked == set(fact_table(0, family)), family


def test_every_word_is_in_the_shipped_vocabulary():
    tok = load_tokenizer(ASSET)
    train, evals = build_facts(0, 100, 100)
    for ex in train + evals:
        ids = tok(ex.prompt + " " + ex.options[ex.answer])["input_ids"]
        assert tok.unk_token_id not in ids, ex.prompt


def test_bad_counts_and_too_many_facts_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        build_facts(0, -1, 5)
    with pytest.raises(ValueError, match="subjects"):
        fact_table(0, "count", n_facts=10_000)


def test_the_benchmark_comparison_is_on_the_facts_suite_and_builds_a_valid_config_for_every_method():
    root = Path(__file__).resolve().parents[2] / "configs"
    spec = read_spec(root / "compare" / "benchmark.yaml")
    assert spec.reference in spec.methods and len(spec.seeds) >= 3
    for method, overrides in spec.methods.items():
        cfg = load_config(spec.base, [*spec.overrides, *overrides])
        assert cfg.data.source == "facts" and not cfg.model.lora.attention, method


def test_a_config_names_the_suite_and_a_bad_one_is_one_line(tmp_path):
    assert load_config(None, ["data.source=facts"]).data.source == "facts"
    with pytest.raises(ConfigError, match="data.source.*offline, facts, commonsense"):
        load_config(None, ["data.source=fact"])


def test_a_run_with_data_source_facts_loads_the_facts_suite():
    from pipeline.federation.inputs import load_federated_data

    cfg = load_config(None, ["data.source=facts", "data.n_train_per_family=20", "data.n_eval_per_family=5"])
    data = load_federated_data(cfg, load_tokenizer(ASSET))
    assert {e.family for e in data.train_examples} == set(FACT_FAMILIES)
    assert len(data.eval_examples) == 5 * len(FACT_FAMILIES) and data.chance == 0.25
    assert sorted(i for part in data.client_indices for i in part) == list(range(len(data.train_examples)))
