"""The evaluation mode switch: score the options (`choice`, scoring.py) or generate and extract
an answer (`generate`, generate.py). Its own module, so neither of those imports the other."""
from __future__ import annotations

from typing import Sequence

from ..data.tasks import Example
from .generate import evaluate_generate
from .scoring import evaluate_choices

__all__ = ["evaluate_examples"]


def evaluate_examples(model, tokenizer, examples: Sequence[Example], mode: str = "choice", batch_size: int = 64,
                      max_new_tokens: int = 8) -> dict:
    """`evaluate_choices` (mode "choice") or generate-and-extract (mode "generate"). Both return
    accuracy, loss (None when generating), per_family, n and format_failures (always 0 when
    scoring choices: the prediction is an option)."""
    if mode == "choice":
        return {**evaluate_choices(model, tokenizer, examples, batch_size=batch_size), "format_failures": 0.0}
    if mode == "generate":
        return evaluate_generate(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    raise ValueError(f"unknown evaluation mode {mode!r} (choice or generate)")
