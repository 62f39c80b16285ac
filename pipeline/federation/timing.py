"""Where a run's wall time and memory go, for metrics.jsonl.

- `load_seconds` on the run's start record: process start to the first evaluation (imports,
  MPI and torch set-up, model, data, engine, and on resume the checkpoint).
- `timing` events at the end of every round (async: block): this rank's seconds in `train` (its
  group's clients), `aggregate` (the end-of-round collective and the method's finalize, including
  any wait for slower groups; async: every buffered aggregation), `evaluate`, `checkpoint` (its
  own event after the checkpoint) and, at the end, `export`. Logged by world rank 0: its phases.
- `peak_memory_gib` on every client event: the peak memory of the rank that trained the client
  (CUDA: allocated bytes during that client's training, what `fedmoe plan` estimates; CPU: the
  process's peak RSS so far, which cannot be reset).
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager

import torch

from pipeline.plan.memory import GIB


class PhaseClock:
    """Seconds per named phase, summed until `take()`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {}
        return taken


def process_seconds() -> float | None:
    """Wall seconds since this process started (Linux: /proc; elsewhere None)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, field 22: ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
