"""The knowledge suite (`data.source: facts`): eight multiple-choice families over a seeded world.

Each family is one relation of a small fictional world (the `hue` of an animal-number pair,
the `owner` of a tool-letter pair, ...) with its own keywords and surface form. A family's
facts (subject -> value) are drawn from the suite seed, so the base model cannot know them
and starts at chance; fine-tuning must store them, and it stores them in the adapters of the
experts the (frozen) router picks. Evaluating the fine-tuned model at a lower top-k then
drops the experts that hold part of what it learned: here top-k is capacity
(`bench/results-facts.txt`), unlike the skills suite (`tasks.py`), on which a model fine-tuned
at top-k 8 scores about the same at top-k 2 (docs/suites.md).

Prompts list their options, so `eval.mode: generate` can extract an answer. Train and eval
prompts are disjoint by the same stable hash as the skills suite; they ask about the same
facts with other distractors and option orders, the way a closed-book QA set asks about
knowledge the training text carried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .tasks import CATEGORIES, LETTERS, NUMBERS, Example, _on_eval_side

__all__ = ["FACT_FAMILIES", "FACTS_PER_FAMILY", "build_facts", "fact_table"]

FACTS_PER_FAMILY = 24  # small enough that FedIT learns them within the benchmark budget
N_OPTIONS = 4


@dataclass(frozen=True)
class _Relation:
    template: str  # {s0} {s1}: the subject's two tokens; {opts}: the options, comma separated
    subject: tuple[tuple[str, ...], tuple[str, ...]]  # the token pools of the subject's two slots
    values: tuple[str, ...]


_DIGITS = tuple(NUMBERS[:10])
_RELATIONS: dict[str, _Relation] = {
    "hue": _Relation("which color is the {s0} {s1} ? {opts} . answer :",
                     (CATEGORIES["animal"], NUMBERS[10:]), CATEGORIES["color"]),
    "owner": _Relation("the {s0} {s1} is which animal ? {opts} . answer :",
                       (CATEGORIES["tool"], LETTERS), CATEGORIES["animal"]),
    "taste": _Relation("which fruit is in {s0} {s1} ? {opts} . answer :",
                       (LETTERS, LETTERS), CATEGORIES["fruit"]),
    "limb": _Relation("same kind as {s0} {s1} : {opts} ?",
                      (CATEGORIES["vehicle"], NUMBERS[10:]), CATEGORIES["body"]),
    "garage": _Relation("key {s0} {s1} : which vehicle ? {opts} . answer :",
                        (CATEGORIES["body"], CATEGORIES["fruit"]), CATEGORIES["vehicle"]),
    "toolbox": _Relation("tag {s0} {s1} ; which tool ? {opts} . answer :",
                         (CATEGORIES["color"], NUMBERS[10:]), CATEGORIES["tool"]),
    "count": _Relation("how many {s0} in {s1} ? {opts} . answer :",
                       (CATEGORIES["fruit"], CATEGORIES["color"]), _DIGITS),
    "code": _Relation("letters {s0} {s1} next : {opts} . answer :",
                      (NUMBERS[10:], NUMBERS[10:]), LETTERS),
}
FACT_FAMILIES: tuple[str, ...] = tuple(_RELATIONS)


def fact_table(seed: int, family: str, n_facts: int = FACTS_PER_FAMILY) -> dict[tuple[str, str], str]:
    """The family's facts for a suite seed: `n_facts` distinct subjects, values spread evenly."""
    rel = _RELATIONS[family]
    rng = random.Random(f"fedmoe/facts/{seed}/{family}")
    pool_a, pool_b = rel.subject
    if n_facts > len(pool_a) * len(pool_b):
        raise ValueError(f"family {family!r} has only {len(pool_a) * len(pool_b)} subjects")
    subjects: dict[tuple[str, str], None] = {}
    while len(subjects) < n_facts:
        subjects[(rng.choice(pool_a), rng.choice(pool_b))] = None
    # Every value about equally often: no answer is a better guess than another.
    values = [rel.values[k % len(rel.values)] for k in range(n_facts)]
    rng.shuffle(values)
    return dict(zip(subjects, values))


def _family_examples(seed: int, family: str, n: int, side: str, n_facts: int) -> list[Example]:
    rel = _RELATIONS[family]
    facts = list(fact_table(seed, family, n_facts).items())
    rng = random.Random(f"fedmoe/facts/{side}/{seed}/{family}")
    want_eval = side == "eval"
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"family {family!r} cannot supply {n} distinct {side} prompts")
        (s0, s1), gold = rng.choice(facts)
        options = rng.sample([v for v in rel.values if v != gold], N_OPTIONS - 1) + [gold]
        rng.shuffle(options)
        prompt = rel.template.format(s0=s0, s1=s1, opts=" , ".join(options))
        # Train prompts may repeat (a fact is seen many times); eval prompts are distinct.
        if _on_eval_side(prompt) != want_eval or (want_eval and prompt in seen):
            continue
        seen.add(prompt)
        out.append(Example(prompt, tuple(options), options.index(gold), family))
    return out


def build_facts(seed: int, n_train_per_family: int, n_eval_per_family: int,
                n_facts: int = FACTS_PER_FAMILY) -> tuple[list[Example], list[Example]]:
    """Train and eval lists over the fact families, in the layout of `tasks.build_benchmark`."""
    if n_train_per_family < 0 or n_eval_per_family < 0:
        raise ValueError("example counts must be >= 0")
    by_family = [_family_examples(seed, f, n_train_per_family, "train", n_facts) for f in FACT_FAMILIES]
    train = [ex for group in zip(*by_family) for ex in group]
    evals = [ex for f in FACT_FAMILIES for ex in _family_examples(seed, f, n_eval_per_family, "eval", n_facts)]
    return train, evals
