"""Commonsense-15K / -170K in the LLM-Adapters layout, as multiple-choice `Example`s.

A record looks like
    {"instruction": "Please choose the correct solution to the question: ...\\n\\n
                     Solution1: ...\\n\\nSolution2: ...\\n\\nAnswer format: solution1/solution2",
     "input": "", "output": "the correct answer is solution1", "answer": "solution1"}

The example's prompt is the LLM-Adapters Alpaca template followed by "the correct answer
is", its options are the record's label set ("solution1", "solution2"), so option
log-likelihood scoring and answer-only training both look at exactly the label token(s) the
papers' generate-and-extract evaluation parses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .tasks import Example

__all__ = ["load_commonsense", "load_test_tree", "record_to_example", "label_family", "TEST_SETS",
           "LLM_ADAPTERS_PATTERNS", "looks_like_file"]

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_LEAD = "the correct answer is"
_FIELDS = ("instruction", "input", "output", "answer")

# The eight evaluation sets, as LLM-Adapters lays them out (dataset/<name>/test.json), and the
# regex its commonsense_evaluate.py extracts each one's answer with (verbatim; see
# pipeline/eval/extract.py). A test record whose answer this regex cannot produce could never
# be scored correct, so the tree loader refuses it.
_ANSWER_N = r"answer1|answer2|answer3|answer4|answer5"
LLM_ADAPTERS_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": _ANSWER_N,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Challenge": _ANSWER_N,
    "ARC-Easy": _ANSWER_N,
    "openbookqa": _ANSWER_N,
}
TEST_SETS: tuple[str, ...] = tuple(LLM_ADAPTERS_PATTERNS)

# Label kind -> (family, default label set when the instruction does not list it).
_NUMBERED = {
    "solution": ("piqa", 2),
    "ending": ("hellaswag", 4),
    "option": ("winogrande", 2),
    "answer": (None, None),  # SIQA (3 answers) or ARC-e / ARC-c / OBQA (4-5): see label_family
}
_LABEL_RE = re.compile(r"^(solution|ending|option|answer)([1-9])$")
_FORMAT_RE = re.compile(r"answer format:\s*([A-Za-z0-9/ ]+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def _kind(label: str) -> str | None:
    if label in ("true", "false"):
        return "truefalse"
    m = _LABEL_RE.match(label)
    return m.group(1) if m else None


def _label_set(instruction: str, answer: str) -> tuple[str, ...]:
    """The record's options: its "Answer format: a/b/c" line, else the kind's usual set."""
    kind = _kind(answer)
    m = _FORMAT_RE.search(instruction)
    if m:
        labels = tuple(x.strip().lower() for x in m.group(1).split("/") if x.strip())
        if labels and all(_kind(x) == kind for x in labels):
            return labels
    if kind == "truefalse":
        return ("true", "false")
    _, n = _NUMBERED[kind]
    if n is None:  # answerN: count the "AnswerK:" markers the question lists
        n = len(set(re.findall(r"answer(\d):", instruction, flags=re.IGNORECASE))) or 4
    n = max(n, int(answer[-1]))
    return tuple(f"{kind}{i}" for i in range(1, n + 1))


def label_family(answer: str, n_options: int) -> str:
    """Task family from the label kind: true/false -> boolq, solutionN -> piqa, ...

    `answerN` labels are shared by SIQA (3 answers) and ARC-e/ARC-c/OBQA (4-5 answers,
    indistinguishable from the record alone), hence "siqa" or "arc_obqa".
    """
    kind = _kind(answer)
    if kind == "truefalse":
        return "boolq"
    if kind == "answer":
        return "siqa" if n_options == 3 else "arc_obqa"
    if kind is None:
        raise ValueError(f"unknown answer label {answer!r}")
    return _NUMBERED[kind][0]


def record_to_example(record: dict, where: str) -> Example:
    """One LLM-Adapters record -> Example; `where` ("file, record i") goes into errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    instruction, answer = record.get("instruction"), record.get("answer")
    extra = record.get("input") or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: field 'instruction' is missing or empty")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: field 'answer' is missing or empty")
    if not isinstance(extra, str):
        raise ValueError(f"{where}: field 'input' must be a string")
    answer = answer.strip().lower()
    if _kind(answer) is None:
        raise ValueError(
            f"{where}: answer {answer!r} is not a known label (true/false, solutionN, answerN, endingN, optionN)"
        )
    options = _label_set(instruction, answer)
    if answer not in options:
        raise ValueError(f"{where}: answer {answer!r} is not among the listed labels {'/'.join(options)}")
    template = PROMPT_WITH_INPUT if extra.strip() else PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra) + ANSWER_LEAD
    return Example(prompt, options, options.index(answer), label_family(answer, len(options)))


def looks_like_file(spec: str) -> bool:
    return spec.endswith((".json", ".jsonl")) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _load_local(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised below with the file and record named
        _locate_bad_record(path)
        raise ValueError(f"{path}: cannot be read as LLM-Adapters JSON records ({type(err).__name__}: {err})") from err
    # A field of mixed types becomes a `Json` column whose strings are re-parsed ("true" -> True):
    # find the offending record rather than score silently altered data.
    if any(f in ds.features and ds.features[f] != datasets.Value("string") for f in _FIELDS):
        _locate_bad_record(path)
        raise ValueError(f"{path}: fields {', '.join(_FIELDS)} must all be strings")
    return ds.to_list()


def _load_dataset(spec: str, split: str) -> list[dict]:
    """A dataset directory or hub id. OSError (not found, unreachable) passes; anything else
    `datasets` raises about the files becomes a ValueError naming them."""
    import datasets

    try:
        return datasets.load_dataset(spec, split=split).to_list()
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - DatasetGenerationError, ValueError, KeyError, ...
        cause = err.__cause__ or err
        raise ValueError(f"{spec}: cannot be read as a dataset ({type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''})") from err


def _quiet_datasets() -> None:
    """Our errors name the file and record; `datasets`' own log lines and bars would come first."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def _locate_bad_record(path: Path) -> None:
    """After `datasets` refused or mangled a file, find the bad record with plain `json`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as whole_err:
        records = []  # maybe JSON lines
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                err = whole_err if lineno == 1 else None
                msg = f"line {err.lineno}, column {err.colno}: {err.msg}" if err else f"line {lineno}"
                raise ValueError(f"{path}: invalid JSON at {msg} (record {len(records)})") from whole_err
    for i, rec in enumerate(records):
        for field in _FIELDS if isinstance(rec, dict) else ():
            if rec.get(field) is not None and not isinstance(rec[field], str):
                raise ValueError(f"{path}, record {i}: field {field!r} must be a string")
        record_to_example(rec, f"{path}, record {i}")


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    return [(name, root / name / "test.json") for name in TEST_SETS if (root / name / "test.json").is_file()]


def load_test_tree(root: str | Path) -> list[Example]:
    """The LLM-Adapters test sets under `root` (its `dataset/` directory): every
    `<name>/test.json` of the eight present, in TEST_SETS order, each example's family being
    the dataset's name. Other directories (their math sets) are ignored."""
    root = Path(root).expanduser()
    files = _tree_files(root)
    if not files:
        raise ValueError(f"{root}: no <dataset>/test.json of the LLM-Adapters layout "
                         f"(looked for {', '.join(TEST_SETS)})")
    out: list[Example] = []
    for name, path in files:
        # Plain json, not `datasets`: a test set is at most a few MB, and this keeps types as written.
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path}: expected a non-empty JSON list of records")
        for i, rec in enumerate(records):
            ex = record_to_example(rec, f"{path}, record {i}")
            gold = ex.options[ex.answer]
            if not re.fullmatch(LLM_ADAPTERS_PATTERNS[name], gold):
                raise ValueError(f"{path}, record {i}: answer {gold!r} is not a {name} label "
                                 f"({LLM_ADAPTERS_PATTERNS[name]})")
            out.append(Example(ex.prompt, ex.options, ex.answer, name))
    return out


def load_commonsense(path_or_hub_id: str | Path, split: str = "train") -> list[Example]:
    """Load LLM-Adapters commonsense records (local JSON/JSONL file, a directory in the
    LLM-Adapters test layout (`load_test_tree`), or a hub dataset id).

    Missing local file -> FileNotFoundError naming the path; a malformed record ->
    ValueError naming the file and the record's index.
    """
    spec = str(path_or_hub_id)
    path = Path(spec).expanduser()
    _quiet_datasets()
    if path.exists():
        if path.is_dir() and _tree_files(path):
            return load_test_tree(path)
        if path.is_dir():
            records, source = _load_dataset(str(path), split), str(path)
        else:
            records, source = _load_local(path, split), str(path)
    elif isinstance(path_or_hub_id, Path) or looks_like_file(spec):
        raise FileNotFoundError(f"commonsense data file not found: {path}")
    else:
        records, source = _load_dataset(spec, split), spec
    if not records:
        raise ValueError(f"{source}: no records")
    return [record_to_example(rec, f"{source}, record {i}") for i, rec in enumerate(records)]
