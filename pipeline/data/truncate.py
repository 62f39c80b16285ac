"""Over-long records are cut before anything tokenizes them.

`encode_choice` keeps only the last `max_length` tokens of a prompt (the option always
survives), yet it tokenizes the whole prompt first, on every batch: one 40 MB record took
minutes and gigabytes. So a prompt longer than CHARS_PER_TOKEN characters per token of the
limit is cut, once, when the data is loaded, to its last that many characters (from a
whitespace, so no word is split). No vocabulary in use has tokens that long on average, so the
tokens that are kept are the same as before, and a record of ordinary length is not touched.
"""
from __future__ import annotations

import dataclasses

from .tasks import Example

__all__ = ["CHARS_PER_TOKEN", "truncate_examples"]

CHARS_PER_TOKEN = 32


def truncate_examples(examples: list[Example], max_tokens: int) -> tuple[list[Example], int]:
    """(examples with over-long prompts cut, how many were cut)."""
    limit = CHARS_PER_TOKEN * max_tokens
    out, cut = [], 0
    for ex in examples:
        if len(ex.prompt) > limit:
            tail = ex.prompt[-limit:]
            space = tail.find(" ", 0, limit // 2)
            ex = dataclasses.replace(ex, prompt=tail[space + 1:] if space >= 0 else tail)
            cut += 1
        out.append(ex)
    return out, cut
