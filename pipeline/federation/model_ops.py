"""A strategy's handle on the model and on a client's data (Strategy.prepare_round / prepare_client).

Methods that work on the base weights (FRLoRA's PiSSA init, FedSmoothLoRA's calibration
gradient and per-client base shifts) go through these objects, so a strategy still sees no
engine, DeepSpeed or MPI: under expert parallelism `base_weights` and `weight_gradients` hold
this rank's experts, in a client group of several ranks the gradient is already summed over it.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from pipeline.engine.calibration import weight_gradients
from pipeline.federation.sampling import GA_INIT, LOCAL_DATA, derive_seed, local_batches
from pipeline.model import ModelSetting, set_base_delta
from pipeline.model.base_delta import LowRank, pristine_weights


class ModelOps:
    def __init__(self, fed):
        self.fed = fed

    def base_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(LoRA pair key, the pristine base weight, float32 on the CPU), one at a time."""
        return pristine_weights(self.fed.engine.model)

    def set_base(self, deltas: dict[str, Tensor], low_rank: LowRank | None = None) -> None:
        set_base_delta(self.fed.engine.model, deltas, low_rank)


class ClientOps(ModelOps):
    def __init__(self, fed, client: int, round_: int):
        super().__init__(fed)
        self.client, self.round = client, round_

    def calibration_batches(self, n_samples: int, batch_size: int) -> list[dict[str, Tensor]]:
        """The first `n_samples` examples the client trains on this round (the official code's
        `train_set[:bsz * iters]` of the round's sample), in batches of `batch_size`."""
        cfg = self.fed.cfg
        seed = derive_seed(cfg.seed, LOCAL_DATA, self.round, self.client)
        steps = math.ceil(n_samples / cfg.train.batch_size)
        order = [i for batch in local_batches(self.fed.data.client_indices[self.client], steps,
                                              cfg.train.batch_size, seed) for i in batch][:n_samples]
        return [self.fed.data.train_batch(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]

    def generator(self, *keys: int) -> torch.Generator:
        """A generator seeded by (run seed, round, client, keys): the same draw wherever this client
        trains, and again after a resume."""
        seed = derive_seed(self.fed.cfg.seed, GA_INIT, self.round, self.client, *keys)
        return torch.Generator().manual_seed(seed)

    def weight_gradients(self, setting: ModelSetting, batches) -> dict[str, Tensor]:
        with torch.enable_grad():
            return weight_gradients(self.fed.engine, setting, batches)
