"""Same seed, same bits: which kernels a run may use.

On CPU the only order-dependent kernels on our path were tensor-indexing backwards (an
index_put_ with multi-threaded float accumulation); the MoE block avoids them by construction
(index_select / index_add_), and PyTorch's deterministic mode is switched on as a guard for
code we do not own (Hugging Face's model, peft). On CPU that mode only serialises those
accumulations, so it costs nothing measurable on our path (bench/tier_step.py).
On CUDA it also needs cuBLAS's fixed workspace; it is off by default there because some fused
kernels (memory-efficient attention backward) have no deterministic variant and are then
reported with a warning instead of an error.
"""
from __future__ import annotations

import os

import torch


def use_deterministic_kernels(setting: bool | None, cuda: bool | None = None) -> bool:
    """Apply `train.deterministic` (None: on for CPU runs, off on CUDA); returns what is in force."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    enabled = (not cuda) if setting is None else bool(setting)
    if enabled and cuda:
        # Read when cuBLAS creates its handle: set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=cuda)
    return enabled
