"""assembly.setup with a caller's model and data (what bench/peer_flower.py uses): they are
used as given, and a round trains on the caller's batches."""
import json

import torch

from pipeline.config import load_config
from pipeline.federation import assembly, rounds
from pipeline.federation.inputs import load_patched_model

from .conftest import TINY


class Tokens:
    """The duck type of FederatedData that the round loop reads: client_indices, train_batch."""

    def __init__(self, clients: int, vocab: int):
        self.rows = torch.randint(1, vocab, (clients * 8, 16), generator=torch.Generator().manual_seed(0))
        self.client_indices = [list(range(c * 8, (c + 1) * 8)) for c in range(clients)]
        self.seen: list[list[int]] = []

    def train_batch(self, indices):
        self.seen.append(list(indices))
        ids = self.rows[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_setup_uses_the_given_model_and_data(tmp_path):
    cfg = load_config(TINY, ["logging.progress=false", "checkpoint.save_merged=false"])
    model, tokenizer = load_patched_model(cfg.model)
    data = Tokens(cfg.federation.clients, model.config.vocab_size)
    parts = assembly.setup(cfg, loaded=(model, tokenizer), data=data)
    assert parts[0] is model and parts[4] is data
    fed = assembly.build(cfg, tmp_path, None, parts)
    before = {k: v.clone() for k, v in fed.strategy.global_adapters.items()}
    rounds.run_round(fed, 1, None)
    assert len(data.seen) == cfg.federation.clients_per_round * cfg.train.local_steps
    assert all(len(b) == cfg.train.batch_size for b in data.seen)
    after = fed.strategy.global_adapters
    assert any(not torch.equal(before[k], after[k]) for k in before)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "client" for e in events) == cfg.federation.clients_per_round
