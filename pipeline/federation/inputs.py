"""What a run reads: the model and tokenizer, the task data and its split across clients."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, ModelConfig
from pipeline.data import (Example, build_benchmark, collate, dirichlet_partition, load_commonsense,
                           load_tokenizer)
from pipeline.errors import UserError
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
    return source  # a hub id such as allenai/OLMoE-1B-7B-0924


def load_patched_model(mcfg: ModelConfig):
    source = resolve_source(mcfg.source)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[mcfg.dtype]
    try:
        model = load_model(source, dtype=dtype)
        tokenizer = load_tokenizer(source)
    except OSError as exc:
        raise UserError(f"model.source: cannot load {source!r}: {str(exc).splitlines()[0]}") from None
    lora = mcfg.lora
    patch_olmoe(model, lora_rank=lora.rank, lora_alpha=lora.alpha, expert_lora=lora.experts,
                attention_lora=lora.attention)
    return model, tokenizer


@dataclass
class FederatedData:
    train_examples: list[Example]
    eval_examples: list[Example]
    client_indices: list[list[int]]  # indices into train_examples, one list per client
    tokenizer: object
    max_length: int

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / len(e.options) for e in self.eval_examples]))

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.train_examples[i] for i in indices], self.tokenizer, self.max_length)


def load_federated_data(cfg: Config, tokenizer) -> FederatedData:
    data = cfg.data
    if data.source == "offline":
        train, evaluation = build_benchmark(cfg.seed, data.n_train_per_family, data.n_eval_per_family)
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
    return FederatedData(train, evaluation, parts, tokenizer, cfg.train.max_length)


def _read_commonsense(path: str, field: str) -> list[Example]:
    try:
        return load_commonsense(path)
    except FileNotFoundError:
        raise UserError(f"{field}: file not found: {path}") from None
    except ValueError as exc:
        raise UserError(f"{field}: {exc}") from None
