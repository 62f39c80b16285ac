"""Turning multiple-choice examples into padded causal-LM batches."""

from __future__ import annotations

from typing import Sequence

import torch

from .tasks import Example

__all__ = ["IGNORE_INDEX", "encode_choice", "collate", "pad_sequences"]

IGNORE_INDEX = -100  # what torch's cross-entropy and HF models skip


def encode_choice(prompt: str, option: str, tokenizer, max_length: int) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + option` and how many of the trailing ids are the option.

    Prompt and option are tokenized separately so that the option's tokens are known
    exactly; the leading space makes BPE tokenizers produce the in-sentence form of the
    option (" true", not "true"). If too long, the prompt is cut from the left so the
    option (what is trained and scored) always survives.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    option_ids = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    if not option_ids:
        raise ValueError(f"option {option!r} tokenizes to nothing")
    if len(option_ids) >= max_length:
        raise ValueError(f"option {option!r} needs {len(option_ids)} tokens, max_length is {max_length}")
    keep = max_length - len(option_ids)
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return prompt_ids + option_ids, len(option_ids)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int) -> torch.Tensor:
    """Right-padded LongTensor [len(seqs), longest]. Right padding keeps position ids plain."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def collate(examples: list[Example], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Batch of prompts followed by their gold option; only the option's tokens are trained.

    Returns `input_ids`, `attention_mask` and `labels` (LongTensors [B, T]); `labels` equals
    `input_ids` on the gold option's tokens and IGNORE_INDEX everywhere else, so a Hugging
    Face causal LM's shifted loss is the answer's negative log-likelihood.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    ids, labels = [], []
    for ex in examples:
        seq, n_opt = encode_choice(ex.prompt, ex.options[ex.answer], tokenizer, max_length)
        ids.append(seq)
        labels.append([IGNORE_INDEX] * (len(seq) - n_opt) + seq[-n_opt:])
    input_ids = pad_sequences(ids, _pad_id(tokenizer))
    attention_mask = pad_sequences([[1] * len(s) for s in ids], 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_sequences(labels, IGNORE_INDEX),
    }
