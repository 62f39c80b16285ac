"""What a run reads: the model and tokenizer, the task data and its split across clients."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from pipeline import hub
from pipeline.config import Config, ModelConfig
from pipeline.data import (Example, build_benchmark, build_facts, collate, dirichlet_partition, load_commonsense,
                           load_tokenizer)
from pipeline.data.commonsense import looks_like_file
from pipeline.data.truncate import truncate_examples
from pipeline.errors import UserError
from pipeline.eval.scoring import MAX_LENGTH as EVAL_MAX_LENGTH
from pipeline.federation.sampling import derive_seed
from pipeline.model import load_model, patch_olmoe

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_SPLIT, PARTITION = 11, 12  # seed streams


def resolve_source(source: str) -> str:
    """A local directory (relative to the working directory, else to the repo), or a hub id."""
    for candidate in (Path(source), REPO_ROOT / source):
        if candidate.is_dir():
            return str(candidate)
    if Path(source).is_absolute() or source.startswith((".", "/")) or source.count("/") > 1:
        raise UserError(f"model.source: no such directory: {source}")
    hub.online()  # offline: only the cache is searched, at once
    return source  # a hub id such as allenai/OLMoE-1B-7B-0924


# What a damaged or incomplete model directory raises inside from_pretrained: a truncated
# safetensors file (SafetensorError), malformed JSON (ValueError), missing files (OSError),
# weights that do not fit the config (RuntimeError).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def load_patched_model(mcfg: ModelConfig):
    source = resolve_source(mcfg.source)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[mcfg.dtype]
    model = _load("model", source, lambda: load_model(source, dtype=dtype))
    tokenizer = _load("tokenizer", source, lambda: load_tokenizer(source))
    lora = mcfg.lora
    patch_olmoe(model, lora_rank=lora.rank, lora_alpha=lora.alpha, expert_lora=lora.experts,
                attention_lora=lora.attention)
    return model, tokenizer


def _load(what: str, source: str, load):
    try:
        return load()
    except _LOAD_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        note = f" ({hub.offline_note()})" if hub.offline_note() and not Path(source).is_dir() else ""
        raise UserError(f"model.source: cannot load the {what} of {source!r}: {first}{note}") from None


@dataclass
class FederatedData:
    train_examples: list[Example]
    eval_examples: list[Example]
    client_indices: list[list[int]]  # indices into train_examples, one list per client
    tokenizer: object
    max_length: int
    truncated: int = 0  # records whose prompt was cut before tokenization (data/truncate.py)

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / len(e.options) for e in self.eval_examples]))

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.train_examples[i] for i in indices], self.tokenizer, self.max_length)


def load_federated_data(cfg: Config, tokenizer) -> FederatedData:
    data = cfg.data
    if data.source == "offline":
        train, evaluation = build_benchmark(cfg.seed, data.n_train_per_family, data.n_eval_per_family)
    elif data.source == "facts":
        train, evaluation = build_facts(cfg.seed, data.n_train_per_family, data.n_eval_per_family)
    else:
        train = _read_commonsense(data.path, "data.path")
        if data.eval_path:
            evaluation = _read_commonsense(data.eval_path, "data.eval_path")
        else:  # a seeded held-out slice, n_eval_per_family per family at most
            rng = np.random.default_rng(derive_seed(cfg.seed, EVAL_SPLIT))
            order = rng.permutation(len(train)).tolist()
            taken: dict[str, int] = {}
            held = set()
            for i in order:
                fam = train[i].family
                if taken.get(fam, 0) < data.n_eval_per_family:
                    taken[fam] = taken.get(fam, 0) + 1
                    held.add(i)
            evaluation = [train[i] for i in sorted(held)]
            train = [e for i, e in enumerate(train) if i not in held]
    n_clients = cfg.federation.clients
    if len(train) < n_clients:
        raise UserError(f"data: {len(train)} training examples for {n_clients} clients")
    parts = dirichlet_partition([e.family for e in train], n_clients, data.dirichlet_alpha,
                                derive_seed(cfg.seed, PARTITION), min_size=1)
    train, cut_train = truncate_examples(train, cfg.train.max_length)
    evaluation, cut_eval = truncate_examples(evaluation, EVAL_MAX_LENGTH)  # what scoring keeps
    return FederatedData(train, evaluation, parts, tokenizer, cfg.train.max_length, cut_train + cut_eval)


def _read_commonsense(path: str, field: str) -> list[Example]:
    local = Path(path).expanduser().exists() or looks_like_file(path)
    if not local:
        hub.online()  # a hub dataset id: offline, only the cache is searched, at once
    try:
        return load_commonsense(path)
    except ValueError as exc:
        raise UserError(f"{field}: {exc}") from None
    except OSError as exc:
        if not local:  # a hub id neither cached nor fetched
            note = hub.offline_note() or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{field}: {path!r} is neither a file nor a dataset on the Hugging Face hub "
                            f"({note})") from None
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"{field}: file not found: {path}") from None
        raise UserError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
