"""Word-level tokenizer of the offline suite, and loading any Hugging Face tokenizer.

The tiny model's vocabulary is a few hundred whole words, numbers 0-99 and punctuation, so
every answer of the suite is exactly one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer", "load_tokenizer"]

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS)  # ids 0, 1, 2


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `words` (lower-cased; punctuation split off; BOS prepended)."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        w = w.lower()
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary entry {w!r} is empty or contains whitespace")
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Isolated punctuation: "(47," -> "(", "47", ","; words and numbers stay whole.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(path)` with a pad token guaranteed (batching needs one)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        # Decoder-only tokenizers often ship without pad; padded positions are masked anyway.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
    return tok
