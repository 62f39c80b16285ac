"""Generative evaluation: greedy decoding with a KV cache, then answer extraction.

Prompts are left-padded into batches (position ids counted from each row's first real
token), run once through the model, and then extended one token per step from the cache.
Greedy means argmax, ties to the lowest token id, so a result depends only on the model,
the prompts and the batch size. A row stops at the tokenizer's EOS token; the loop stops
when every row has (not in a torch.distributed world of several ranks, where forwards are
collectives), or after `max_new_tokens`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Callable, Sequence

import torch

from ..data.tasks import Example
from .extract import answer_extractor
from .scoring import model_device

__all__ = ["greedy_generate", "evaluate_generate"]


def _cache_kwarg(model) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; older versions only know the first.
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                    eos_id: int | None, device: torch.device, cache_kw: str) -> list[list[int]]:
    from transformers import DynamicCache

    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                   logits_to_keep=1, **{cache_kw: cache}).logits
    last = position[:, -1:]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    # Under ZeRO-3 or expert parallelism every forward is a collective of the evaluating ranks:
    # they all run max_new_tokens steps rather than trust their EOS decisions to agree.
    lockstep = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token)
        if eos_id is not None:
            done |= token == eos_id
        if step == max_new_tokens - 1 or (bool(done.all()) and not lockstep):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                       logits_to_keep=1, **{cache_kw: cache}).logits
    tokens = torch.stack(out, dim=1).tolist()
    return [[t for t in row if t != pad_id and t != eos_id] for row in tokens]


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
                    max_length: int = 512, progress: Callable[[int], None] | None = None) -> list[str]:
    """The greedy continuation of each prompt, decoded (special tokens dropped).

    A prompt longer than `max_length - max_new_tokens` tokens (or the model's position limit)
    is cut from the left, as the choice scorer cuts it. `progress(n)` is called after each
    batch with the number of prompts done in it.
    """
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length)) - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-limit:] for p in prompts]
    # Longest first: similar lengths share a batch, so less padding; the order is fixed.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    device, cache_kw = model_device(model), _cache_kwarg(model)
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = _generate_batch(model, [encoded[i] for i in chunk], max_new_tokens, pad_id, eos_id,
                                   device, cache_kw)
            for i, row in zip(chunk, rows):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return texts


def evaluate_generate(model, tokenizer, examples: Sequence[Example], batch_size: int = 64,
                      max_new_tokens: int = 8, max_length: int = 512,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Accuracy, share of format failures and per-family accuracy by generate-and-extract.

    A generation from which no answer can be extracted counts as wrong and as a format
    failure. `loss` is None: generation scores no likelihood.
    """
    if not examples:
        raise ValueError("evaluate_generate needs at least one example")
    texts = greedy_generate(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens,
                            batch_size=batch_size, max_length=max_length, progress=progress)
    extract = answer_extractor(examples)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # correct, failures, total
    for ex, text in zip(examples, texts):
        pred = extract(ex, text)
        h = hits[ex.family]
        h[0] += int(pred == ex.options[ex.answer])
        h[1] += int(pred == "")
        h[2] += 1
    n = len(examples)
    return {
        "accuracy": sum(h[0] for h in hits.values()) / n,
        "format_failures": sum(h[1] for h in hits.values()) / n,
        "loss": None,
        "per_family": {fam: h[0] / h[2] for fam, h in sorted(hits.items())},
        "per_family_format_failures": {fam: h[1] / h[2] for fam, h in sorted(hits.items())},
        "n": n,
        "generations": texts,
    }
