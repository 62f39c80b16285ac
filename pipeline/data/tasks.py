"""The offline benchmark suite: eight multiple-choice task families with one-token answers.

The families stand in for the eight commonsense subsets the papers use (BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA). Each has its own keywords and surface format so
that routing can specialise per family, and each needs a different skill (order, arithmetic,
copying, word knowledge, counting). Everything is generated from a seed with `random.Random`,
so the suite needs no download and is identical on every machine.

Train and eval prompts are disjoint twice over: every prompt is assigned to the train or the
eval side by a stable hash of its text (so the eval prompts of one seed never appear in the
training data of any seed), and within a side prompts are drawn without repetition.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "Example",
    "FAMILIES",
    "FAMILY_CHANCE",
    "CATEGORIES",
    "build_benchmark",
    "generate_family",
    "pretraining_line",
    "suite_vocabulary",
]


@dataclass(frozen=True)
class Example:
    """One multiple-choice item. The model is scored on `prompt + " " + options[i]`."""

    prompt: str
    options: tuple[str, ...]
    answer: int
    family: str

    def __post_init__(self) -> None:
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer {self.answer} out of range for {len(self.options)} options")


# Word categories for the `category` and `last` families. Each word is in one category only
# (no "orange" as both fruit and colour) so membership is unambiguous.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf"),
    "fruit": ("apple", "pear", "banana", "grape", "lemon", "mango", "peach", "plum", "cherry", "melon"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "chisel", "pliers", "ladder"),
    "vehicle": ("car", "bus", "truck", "bike", "train", "boat", "ship", "plane", "taxi", "tram"),
    "body": ("hand", "foot", "head", "arm", "leg", "nose", "ear", "eye", "knee", "neck"),
}
WORDS: tuple[str, ...] = tuple(w for ws in CATEGORIES.values() for w in ws)
WORD_CATEGORY: dict[str, str] = {w: c for c, ws in CATEGORIES.items() for w in ws}
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")
COUNT_LETTERS: tuple[str, ...] = tuple("bcdfghkmnprstvwz")  # no vowels: "a" and "i" read as words
COUNT_LENGTH = 6  # fixed, so the count is the share of letters among the items
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(100))  # each is one token

# Facts the pretraining text states, for only part of the words and numbers: fine-tuning
# links known facts to the task formats quickly and must learn the rest from the training
# examples, so accuracy climbs over time instead of jumping to 1. Word categories are
# stated word -> category ("apple fruit"); stating them as lists ("fruit : apple , pear")
# primes same-category words and lifts the base model above chance on `category`.
KNOWN_PER_CATEGORY = 5
KNOWN_PARITY: tuple[int, ...] = tuple(sorted(random.Random("fedmoe/parity-facts").sample(range(100), 50)))
WORD_FACTS: tuple[str, ...] = tuple(f"{w} {c}" for c, ws in CATEGORIES.items() for w in ws[:KNOWN_PER_CATEGORY])

EVAL_SHARE = 5  # one prompt in EVAL_SHARE lands on the eval side of the hash split


def _on_eval_side(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % EVAL_SHARE == 0


def _choose_options(rng: random.Random, gold: str, distractors: list[str], n: int) -> tuple[tuple[str, ...], int]:
    """`n` options: gold plus `n-1` distinct distractors, in random order."""
    pool = [d for d in dict.fromkeys(distractors) if d != gold]
    picked = rng.sample(pool, n - 1) + [gold]
    rng.shuffle(picked)
    return tuple(picked), picked.index(gold)


# ---------------------------------------------------------------- family generators
# Each returns an `_Item`: the prompt, the options, the gold index, and `pool`, the answers
# the pretraining text may mark for this prompt. `pool` must not depend on the gold answer
# (e.g. all listed numbers, not the four options that always contain the maximum), otherwise
# the base model would learn the task from the answer frequencies.


@dataclass(frozen=True)
class _Item:
    prompt: str
    options: tuple[str, ...]
    answer: int
    pool: tuple[str, ...]


def _distinct_numbers(rng: random.Random, n: int, lo: int = 10, hi: int = 99) -> list[int]:
    return rng.sample(range(lo, hi + 1), n)


def _largest(rng: random.Random) -> _Item:
    nums = [str(x) for x in _distinct_numbers(rng, 5)]
    prompt = "numbers " + " ".join(nums) + " . the largest is"
    gold = max(nums, key=int)
    return _Item(prompt, *_choose_options(rng, gold, nums, 4), pool=tuple(nums))


def _smallest(rng: random.Random) -> _Item:
    nums = [str(x) for x in _distinct_numbers(rng, 5)]
    prompt = "min ( " + " , ".join(nums) + " ) ="
    gold = min(nums, key=int)
    return _Item(prompt, *_choose_options(rng, gold, nums, 4), pool=tuple(nums))


def _next(rng: random.Random) -> _Item:
    # Step +-1 is plain counting (in the pretraining text), so it is left out.
    step = rng.choice([s for s in range(-12, 13) if abs(s) >= 2])
    length = rng.randint(3, 6)
    span = abs(step) * length  # the gold term is `length` steps from the first
    first = rng.randint(span, 99) if step < 0 else rng.randint(0, 99 - span)
    seq = [first + i * step for i in range(length)]
    gold = seq[-1] + step
    prompt = "sequence " + " , ".join(map(str, seq)) + " , next :"
    near = [gold + d for d in (-3, -2, -1, 1, 2, 3)] + [seq[-1], gold + step]
    near_s = [str(x) for x in near if 0 <= x <= 99]
    # Pretraining answers: anything within 12 of the last term, so gold is not favoured.
    window = tuple(str(x) for x in range(max(0, seq[-1] - 12), min(99, seq[-1] + 12) + 1))
    return _Item(prompt, *_choose_options(rng, str(gold), near_s, 4), pool=window)


def _last(rng: random.Random) -> _Item:
    items = rng.sample(WORDS, rng.randint(4, 7))
    prompt = "list : " + " , ".join(items) + " . last item :"
    return _Item(prompt, *_choose_options(rng, items[-1], items, 4), pool=tuple(items))


def _category(rng: random.Random) -> _Item:
    cats = rng.sample(sorted(CATEGORIES), 4)
    words = [rng.choice(CATEGORIES[c]) for c in cats]
    gold = words[0]  # the word of the asked category, cats[0]
    rng.shuffle(words)
    prompt = f"which one is a {cats[0]} ? " + " , ".join(words) + " . answer :"
    return _Item(prompt, tuple(words), words.index(gold), pool=tuple(words))


def _samekind(rng: random.Random) -> _Item:
    cats = rng.sample(sorted(CATEGORIES), 4)
    cue, gold = rng.sample(CATEGORIES[cats[0]], 2)
    words = [gold] + [rng.choice(CATEGORIES[c]) for c in cats[1:]]
    rng.shuffle(words)
    prompt = f"same kind as {cue} : " + " , ".join(words) + " ?"
    return _Item(prompt, tuple(words), words.index(gold), pool=tuple(words))


def _count(rng: random.Random) -> _Item:
    k = rng.randint(1, 4)
    fillers = WORDS + NUMBERS[10:]
    seq = [rng.choice(COUNT_LETTERS) for _ in range(k)] + [rng.choice(fillers) for _ in range(COUNT_LENGTH - k)]
    rng.shuffle(seq)
    prompt = "how many letters : " + " ".join(seq) + " ?"
    options = ("1", "2", "3", "4")
    return _Item(prompt, options, k - 1, pool=options)


def _parity(rng: random.Random) -> _Item:
    even, odd = str(2 * rng.randrange(50)), str(2 * rng.randrange(50) + 1)
    want = rng.choice(("even", "odd"))
    pair = [even, odd]
    rng.shuffle(pair)
    prompt = f"which is {want} : {pair[0]} or {pair[1]} ?"
    gold = even if want == "even" else odd
    return _Item(prompt, tuple(pair), pair.index(gold), pool=tuple(pair))


_GENERATORS: dict[str, Callable[[random.Random], _Item]] = {
    "largest": _largest,
    "smallest": _smallest,
    "next": _next,
    "last": _last,
    "category": _category,
    "samekind": _samekind,
    "count": _count,
    "parity": _parity,
}
FAMILIES: tuple[str, ...] = tuple(_GENERATORS)
FAMILY_CHANCE: dict[str, float] = {f: (0.5 if f == "parity" else 0.25) for f in FAMILIES}


# ---------------------------------------------------------------- the suite


def _family_rng(seed: int, family: str, purpose: str) -> random.Random:
    # A string seed goes through sha512 inside `random`, so this is stable across processes.
    return random.Random(f"fedmoe/{purpose}/{seed}/{family}")


def generate_family(family: str, n: int, seed: int, side: str) -> list[Example]:
    """`n` examples of one family with distinct prompts, all from the `side` ("train"/"eval")."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if side not in ("train", "eval"):
        raise ValueError(f"side must be 'train' or 'eval', got {side!r}")
    rng = _family_rng(seed, family, side)
    want_eval = side == "eval"
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"family {family!r} cannot supply {n} distinct {side} prompts")
        item = _GENERATORS[family](rng)
        if item.prompt in seen or _on_eval_side(item.prompt) != want_eval:
            continue
        seen.add(item.prompt)
        out.append(Example(item.prompt, item.options, item.answer, family))
    return out


def build_benchmark(seed: int, n_train_per_family: int, n_eval_per_family: int) -> tuple[list[Example], list[Example]]:
    """Train and eval lists over all families; deterministic in `seed`, prompts disjoint.

    Train examples are interleaved family by family (a prefix of the list covers every
    family); eval examples are grouped by family.
    """
    if n_train_per_family < 0 or n_eval_per_family < 0:
        raise ValueError("example counts must be >= 0")
    train_by_family = [generate_family(f, n_train_per_family, seed, "train") for f in FAMILIES]
    train = [ex for group in zip(*train_by_family) for ex in group]
    evals = [ex for f in FAMILIES for ex in generate_family(f, n_eval_per_family, seed, "eval")]
    return train, evals


def _generic_line(rng: random.Random) -> str:
    """Text with no task in it: runs, word lists, facts about words and numbers.

    Counting runs, alphabet runs, `WORD_FACTS` and the even/odd lists are the "world knowledge" the tasks draw on,
    the way commonsense benchmarks draw on what a language model read in pretraining;
    nothing here says which answer a task prompt should get.
    """
    kind = rng.randrange(7)
    if kind == 0:
        start = rng.randrange(0, 92)
        return "counting " + " ".join(str(start + i) for i in range(rng.randint(3, 8)))
    if kind == 1:
        step, length = rng.randint(2, 12), rng.randint(3, 6)
        start = rng.randrange(0, 100 - step * (length - 1))
        return f"step {step} : " + " ".join(str(start + i * step) for i in range(length))
    if kind == 2:
        start = rng.randrange(0, 20)
        return "letters " + " ".join(LETTERS[start : start + rng.randint(3, 7)])
    if kind == 3:
        return "words : " + " , ".join(rng.sample(WORDS, rng.randint(2, 6)))
    if kind == 4:
        return "tag " + " , ".join(rng.choice(WORD_FACTS) for _ in range(rng.randint(1, 4)))
    if kind == 5:
        parity = rng.randrange(2)
        known = [n for n in KNOWN_PARITY if n % 2 == parity]
        return ("even", "odd")[parity] + " : " + " ".join(map(str, rng.sample(known, rng.randint(2, 6))))
    pairs = [f"{rng.choice(WORDS)} : {rng.randrange(100)}" for _ in range(rng.randint(1, 3))]
    return "key " + " ; ".join(pairs)


def pretraining_line(rng: random.Random, generic_share: float = 0.4) -> str:
    """One line of pretraining text: generic text, or a task prompt with a random answer.

    Task-format lines teach the surface format (which kind of token comes after which
    keyword) but not the task: the marked answer is drawn from a pool that does not depend
    on the gold answer.
    """
    if rng.random() < generic_share:
        return _generic_line(rng)
    item = _GENERATORS[rng.choice(FAMILIES)](rng)
    return f"{item.prompt} {rng.choice(item.pool)}"


def suite_vocabulary() -> list[str]:
    """Every word the suite can produce, for building the word-level tokenizer."""
    fixed = (
        "numbers the largest is min ( ) , = + mod sequence next : list last item . "
        "which one a ? answer how many in even or odd same kind as counting step letters words key tag ;"
    ).split()
    return list(dict.fromkeys([*fixed, *CATEGORIES, *WORDS, *LETTERS, *NUMBERS]))
