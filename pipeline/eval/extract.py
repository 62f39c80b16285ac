"""Answer extraction for generative evaluation: which label a generated text names.

Commonsense families follow LLM-Adapters' `commonsense_evaluate.py` `extract_answer`
exactly: one case-sensitive regex per dataset, searched in the stripped generation, first
match wins, no match gives "" (scored wrong). Its regexes match substrings, so "untrue"
reads as "true" and "solution12" as "solution1"; that is kept, since their numbers are
what ours are compared with.

The offline suite has no label words, so its rule is the nearest equivalent: the family's
label set is every option that family's evaluated prompts offer (all numbers 0-99 seen as
options, all category words, ...), and the prediction is the label that occurs first in the
generation as a whole word ("12" does not match inside "120"). As in LLM-Adapters, a
prediction that is a label of the family but not an option of this prompt is just wrong.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Sequence

from ..data.commonsense import LLM_ADAPTERS_PATTERNS
from ..data.tasks import Example

__all__ = ["LLM_ADAPTERS_PATTERNS", "FAMILY_DATASET", "extract_llm_adapters", "first_label", "answer_extractor"]

# Family names of `pipeline.data.commonsense` -> the dataset whose rule applies. Families
# read from the LLM-Adapters test tree are the dataset names themselves.
FAMILY_DATASET: dict[str, str] = {
    **{name: name for name in LLM_ADAPTERS_PATTERNS},
    "siqa": "social_i_qa",
    "arc_obqa": "ARC-Easy",  # ARC-e, ARC-c and OBQA share one rule
}


def extract_llm_adapters(dataset: str, sentence: str) -> str:
    """LLM-Adapters' extract_answer(dataset, sentence): the first match, or ""."""
    found = re.findall(LLM_ADAPTERS_PATTERNS[dataset], sentence.strip())
    return found[0] if found else ""


def first_label(text: str, labels: Sequence[str]) -> str:
    """The label whose first whole-word occurrence in `text` is earliest ("" if none).

    At equal start the longer label wins, so a multi-word label beats its first word.
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", text)
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), label)
    return best[2] if best else ""


def answer_extractor(examples: Sequence[Example]) -> Callable[[Example, str], str]:
    """A function (example, generated text) -> extracted label ("" = format failure).

    Offline families' label sets are taken from `examples` (the whole evaluated set), so
    the rule does not depend on how the suite's generators are written.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    for ex in examples:
        if ex.family not in FAMILY_DATASET:
            labels[ex.family].update(ex.options)
    ordered = {fam: sorted(opts) for fam, opts in labels.items()}  # fixed order: same result every run

    def extract(example: Example, text: str) -> str:
        dataset = FAMILY_DATASET.get(example.family)
        if dataset is not None:
            return extract_llm_adapters(dataset, text)
        return first_label(text, ordered.get(example.family, example.options))

    return extract
