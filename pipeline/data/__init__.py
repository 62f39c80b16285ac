"""Data: the offline suites (skills, facts), tokenizers, non-IID partitions, batching, Commonsense-15K."""

from .batching import IGNORE_INDEX, collate, encode_choice
from .commonsense import load_commonsense
from .facts import FACT_FAMILIES, build_facts
from .partition import dirichlet_partition
from .tasks import FAMILIES, FAMILY_CHANCE, Example, build_benchmark
from .tokenizer import build_word_tokenizer, load_tokenizer

__all__ = [
    "Example",
    "FACT_FAMILIES",
    "FAMILIES",
    "FAMILY_CHANCE",
    "IGNORE_INDEX",
    "build_benchmark",
    "build_facts",
    "build_word_tokenizer",
    "collate",
    "dirichlet_partition",
    "encode_choice",
    "load_commonsense",
    "load_tokenizer",
]
