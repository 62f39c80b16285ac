"""The asynchronous server's handle on the model (AsyncStrategy.aggregate): mean-pooled
penultimate features on a calibration batch, differentiable in the adapters (AlignFed's
cross-version alignment). The model's own parameters and counters are left as they were."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from pipeline.federation.sampling import derive_seed
from pipeline.model.moe_block import HeteroMoEBlock

CALIBRATION = 13  # seed stream of the server's calibration batch


def decoder_and_prefix(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The decoder whose last output (after the final norm) holds the penultimate features,
    and its name in `model` (adapter keys start with it)."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return decoder, f"{name}." if name else ""
    raise ValueError("the model has no decoder module")


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """Per example, the mean over its real tokens: [B, T, H] -> [B, H]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@contextmanager
def counters_kept(model: torch.nn.Module):
    """Routed-token counters as they were before the block (an extra forward must not count)."""
    blocks = [m for m in model.modules() if isinstance(m, HeteroMoEBlock)]
    saved = [b.token_counts.clone() for b in blocks]
    try:
        yield
    finally:
        for b, c in zip(blocks, saved):
            b.token_counts.copy_(c)


def features_with(model: torch.nn.Module, adapters: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Mean-pooled penultimate features [B, H] of `batch` with the adapters replaced by `adapters`."""
    decoder, prefix = decoder_and_prefix(model)
    params = dict(model.named_parameters())
    swapped = {k[len(prefix):]: v.to(device=params[k].device, dtype=params[k].dtype)
               for k, v in adapters.items() if k.startswith(prefix)}
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    with counters_kept(model):
        out = functional_call(decoder, swapped, args=(), kwargs=inputs, strict=False)
    return pooled(out.last_hidden_state.float(), inputs["attention_mask"])


class ServerOps:
    def __init__(self, fed):
        self.fed = fed

    def calibration_batch(self, size: int) -> dict[str, Tensor]:
        """`size` training examples drawn by seed from all clients' data: a stand-in for the
        server's small public calibration set (docs/async.md)."""
        pool = sorted(i for idx in self.fed.data.client_indices for i in idx)
        rng = np.random.default_rng(derive_seed(self.fed.cfg.seed, CALIBRATION))
        chosen = sorted(int(i) for i in rng.choice(len(pool), size=min(size, len(pool)), replace=False))
        return self.fed.data.train_batch([pool[i] for i in chosen])

    def use_full_model(self) -> None:
        """The server's forward passes run at the model's full top-k and LoRA rank."""
        strategy, model = self.fed.strategy, self.fed.engine.model
        self.fed.engine.use(strategy.setting(model.config.num_experts_per_tok, self.fed.cfg.model.lora.rank))

    def mean_features(self, adapters: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """The batch's mean feature vector [H] with `adapters` (differentiable in them)."""
        return features_with(self.fed.engine.model, adapters, batch).mean(0)
