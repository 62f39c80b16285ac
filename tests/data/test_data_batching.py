"""collate: answer-only labels, padding, truncation."""

import pytest
import torch

from pipeline.data import IGNORE_INDEX, Example, build_word_tokenizer, collate

TOK = build_word_tokenizer("is 3 + 4 even or odd ? the answer red blue green".split())


def test_labels_cover_only_the_gold_option():
    exs = [
        Example("is 3 + 4 even or odd ?", ("even", "odd"), 1, "parity"),
        Example("the answer", ("red", "blue", "green"), 2, "colors"),
    ]
    batch = collate(exs, TOK, max_length=32)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 10)  # <bos> + 8 words + answer
    # Row 0: the answer "odd" is the last real token.
    assert labels[0].tolist() == [IGNORE_INDEX] * 9 + [TOK.convert_tokens_to_ids("odd")]
    # Row 1 is shorter: padding is masked and never labelled.
    assert mask[1].tolist() == [1, 1, 1, 1] + [0] * 6
    assert ids[1, 4:].tolist() == [TOK.pad_token_id] * 6
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + [TOK.convert_tokens_to_ids("green")] + [IGNORE_INDEX] * 6
    assert ids[0, 0] == TOK.bos_token_id


def test_long_prompts_are_cut_from_the_left_keeping_the_answer():
    ex = Example("the answer " * 20, ("red", "blue"), 0, "x")
    batch = collate([ex], TOK, max_length=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0, -1] == TOK.convert_tokens_to_ids("red")
    assert (batch["labels"][0, :-1] == IGNORE_INDEX).all()


def test_empty_batch_is_refused():
    with pytest.raises(ValueError):
        collate([], TOK, max_length=8)
