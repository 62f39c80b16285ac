"""Answer extraction on hand-written generations: LLM-Adapters' rules per dataset, the offline rule."""
import pytest

from pipeline.data import Example
from pipeline.eval.extract import (FAMILY_DATASET, answer_extractor, extract_llm_adapters,
                                   first_label)

# (dataset, generation, what LLM-Adapters' extract_answer returns)
CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "  false. Because true statements ...", "false"),  # first match wins
    ("boolq", "The correct answer is True", ""),  # case-sensitive: "True" is no answer
    ("boolq", "it is untrue", "true"),  # substring match, as in their regex
    ("boolq", "yes", ""),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution 1", ""),  # a space breaks the label
    ("piqa", "answer1", ""),  # another dataset's label
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer5", "answer5"),  # in the pattern even when SIQA has 3 answers
    ("social_i_qa", "Answer2", ""),
    ("ARC-Challenge", "answer4 or answer1", "answer4"),
    ("ARC-Easy", "the correct answer is answer12", "answer1"),  # substring: first five labels only
    ("openbookqa", "the correct answer is", ""),  # cut off before the label
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5", ""),
    ("winogrande", "option2 fits the blank", "option2"),
    ("winogrande", "option 1", ""),
    ("winogrande", "", ""),
]


@pytest.mark.parametrize("dataset, text, want", CASES)
def test_llm_adapters_rules(dataset, text, want):
    assert extract_llm_adapters(dataset, text) == want


def test_every_test_set_has_a_rule_and_label_families_map_to_one():
    assert set(FAMILY_DATASET) >= {"boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge",
                                   "ARC-Easy", "openbookqa", "siqa", "arc_obqa"}
    assert FAMILY_DATASET["siqa"] == "social_i_qa" and FAMILY_DATASET["arc_obqa"] == "ARC-Easy"


@pytest.mark.parametrize("text, want", [
    ("57 . the largest", "57"),
    ("the largest is 12 , 57", "12"),  # earliest label anywhere in the text
    ("120 ) 12", "12"),  # whole words only: "12" is not read inside "120"
    (") = :", ""),  # nothing answer-like: a format failure
    ("dark blue car", "dark blue"),  # at the same start the longer label wins
])
def test_first_label(text, want):
    assert first_label(text, ["12", "57", "blue", "dark blue", "car"]) == want


def test_extractor_dispatches_by_family_and_uses_the_familys_label_set():
    exs = [
        Example("numbers 10 20 . the largest is", ("10", "20"), 1, "largest"),
        Example("numbers 30 40 . the largest is", ("30", "40"), 1, "largest"),
        Example("Q? the correct answer is", ("solution1", "solution2"), 0, "piqa"),
        Example("Q? the correct answer is", ("answer1", "answer2", "answer3"), 2, "siqa"),
    ]
    extract = answer_extractor(exs)
    # A label of the family that is not an option of this prompt is extracted (and scored wrong).
    assert extract(exs[0], "40 , 20") == "40"
    assert extract(exs[0], "99") == ""  # never an option of the family: no answer
    assert extract(exs[2], "solution2 is right") == "solution2"
    assert extract(exs[2], "solution") == ""
    assert extract(exs[3], "answer3") == "answer3"
