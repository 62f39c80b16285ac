"""Multiple-choice scoring by option log-likelihood (`eval.mode: choice`; the switch is modes.py).

The score of option i is the sum of the log-probabilities of its tokens after the prompt;
the prediction is the best-scoring option. This needs no generation and no answer parsing,
and it is the same quantity the answer-only training loss (`pipeline.data.collate`) trains.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.batching import encode_choice, pad_sequences
from ..data.tasks import Example

__all__ = ["evaluate_choices", "option_scores", "model_device", "MAX_LENGTH"]

MAX_LENGTH = 512  # tokens of prompt and option an evaluation keeps (a run uses the default)


@dataclass
class _Query:
    """One forward sequence and the (example, option) scores it yields."""

    ids: list[int]
    # (example index, option index, position of the option's first token, option token ids)
    reads: list[tuple[int, int, int, list[int]]]


def _queries(examples: Sequence[Example], tokenizer, max_length: int) -> list[_Query]:
    queries = []
    for ei, ex in enumerate(examples):
        encoded = [encode_choice(ex.prompt, opt, tokenizer, max_length) for opt in ex.options]
        prefixes = {tuple(seq[:-n]) for seq, n in encoded}
        if all(n == 1 for _, n in encoded) and len(prefixes) == 1:
            # One-token options after one shared prompt: a single forward scores them all.
            prompt = list(prefixes.pop())
            reads = [(ei, oi, len(prompt), seq[-1:]) for oi, (seq, _) in enumerate(encoded)]
            queries.append(_Query(prompt, reads))
        else:
            for oi, (seq, n) in enumerate(encoded):
                queries.append(_Query(seq[:-1], [(ei, oi, len(seq) - n, seq[-n:])]))
    return queries


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def option_scores(model, tokenizer, examples: Sequence[Example], batch_size: int = 64, max_length: int = MAX_LENGTH) -> list[list[float]]:
    """Summed log-probability of every option of every example: scores[i][j] for option j."""
    scores = [[0.0] * len(ex.options) for ex in examples]
    queries = _queries(examples, tokenizer, max_length)
    # Longest first: similar lengths share a batch, so less padding.
    queries.sort(key=lambda q: -len(q.ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            input_ids = pad_sequences([q.ids for q in chunk], pad_id).to(device)
            attention_mask = pad_sequences([[1] * len(q.ids) for q in chunk], 0).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, q in enumerate(chunk):
                for ei, oi, pos, option_ids in q.reads:
                    # The token at position p is predicted by the logits at p - 1.
                    steps = torch.arange(pos - 1, pos - 1 + len(option_ids), device=device)
                    targets = torch.as_tensor(option_ids, device=device)
                    scores[ei][oi] = float(logprobs[row, steps, targets].sum())
    finally:
        model.train(was_training)
    return scores


def evaluate_choices(model, tokenizer, examples: Sequence[Example], batch_size: int = 64, max_length: int = MAX_LENGTH) -> dict:
    """Accuracy, gold-option loss and per-family accuracy of `model` on `examples`.

    `loss` is the gold option's negative log-likelihood averaged over its tokens (for the
    suite's one-token answers: the mean cross-entropy of the answer). Ties go to the first
    option. The model's train/eval mode is restored afterwards.
    """
    if not examples:
        raise ValueError("evaluate_choices needs at least one example")
    scores = option_scores(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    correct = 0
    nll, n_tokens = 0.0, 0
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ex, row in zip(examples, scores):
        pred = max(range(len(row)), key=lambda j: (row[j], -j))
        ok = int(pred == ex.answer)
        correct += ok
        hits[ex.family][0] += ok
        hits[ex.family][1] += 1
        gold_tokens = len(tokenizer(" " + ex.options[ex.answer], add_special_tokens=False)["input_ids"])
        nll -= row[ex.answer]
        n_tokens += gold_tokens
    return {
        "accuracy": correct / len(examples),
        "loss": nll / max(n_tokens, 1),
        "per_family": {fam: h[0] / h[1] for fam, h in sorted(hits.items())},
        "n": len(examples),
    }
