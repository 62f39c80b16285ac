"""Metrics sinks: `RUN/metrics.jsonl` (the record of a run), TensorBoard, and the per-round table.

metrics.jsonl holds one JSON object per event, each with `event` and `time` (unix seconds):

    eval    round, tier, top_k, lora_rank, mode, accuracy, loss, format_failures, per_family,
            chance (round 0 = base); generate mode adds per_family_format_failures, loss is null
    client  round, client, tier, top_k, train_loss, steps, n_samples, seconds
    round   round, seconds, clients, expert_load {tier: [[tokens per expert] per layer]}
    reject  round, client, reason
    run     status (started | resumed | finished | stopped | diverged), round
    data    train, eval (examples), truncated (records cut before tokenization)
    divergence  round, tier, reason, evals (in a row), action (warn | stop)

The file is the source of truth; TensorBoard is a view of it. Checkpoints store `offset()`, and a
resumed run truncates the file back to it, so events of rounds that are redone appear once.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from numbers import Real
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

__all__ = ["MetricsLogger", "read_metrics", "round_table", "eval_tables", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"

# Identifiers and settings rather than measurements: not worth a TensorBoard curve.
_NOT_SCALARS = {"round", "client", "top_k", "lora_rank", "chance", "time"}


class MetricsLogger:
    """Appends events to `run_dir/metrics.jsonl` (flushed per event), mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_offset: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_offset is not None:
            _truncate(self.path, resume_offset)
        else:
            _drop_torn_tail(self.path)
        # Binary append: byte offsets are exact and every write lands at the end.
        self._file = open(self.path, "ab")
        self._writer = _summary_writer(self.run_dir / "tensorboard") if tensorboard else None

    def log(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields, "time": time.time()}
        line = json.dumps(record, default=_to_json) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()  # a killed run keeps every event logged before the kill
        if self._writer is not None and event in ("eval", "client"):
            self._to_tensorboard(event, record)

    def offset(self) -> int:
        """Byte size of metrics.jsonl now; a checkpoint stores it to truncate back to on resume."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _to_tensorboard(self, event: str, record: dict) -> None:
        step = record.get("round")
        if not isinstance(step, int):
            return
        # Clients of one tier share a round, so each client gets its own curve.
        suffix = str(record.get("tier", "all"))
        if event == "client":
            suffix += f"/client_{record.get('client')}"
        for name, value in _scalars(record):
            self._writer.add_scalar(f"{event}/{name}/{suffix}", value, step)
        self._writer.flush()


def read_metrics(run_dir: Path) -> list[dict]:
    """All events of `run_dir/metrics.jsonl`; a torn last line (a kill mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    events = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines):  # newline-terminated, so not torn: say so
                warnings.warn(f"{path}:{number}: skipping a line that is not JSON")
            continue  # the last line of a file cut off mid-write
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


def round_table(evals: list[dict], previous: dict[str, float] | None,
                chance: float | None) -> Table:
    """One row per tier: tier, top_k, accuracy, change vs that tier's previous eval, loss
    (in generate mode, which has no loss: the share of format failures)."""
    generate = any(row.get("mode") == "generate" for row in evals)
    table = Table(show_header=True, header_style="bold")
    table.add_column("tier")
    table.add_column("top_k", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("change", justify="right")
    table.add_column("format failures" if generate else "loss", justify="right")
    for row in evals:
        tier = str(row.get("tier", "?"))
        accuracy = row.get("accuracy")
        before = (previous or {}).get(tier)
        last = percent(row.get("format_failures")) if generate else _fmt(row.get("loss"), "{:.4f}")
        table.add_row(tier, _fmt(row.get("top_k"), "{}"), percent(accuracy), _change(accuracy, before), last)
    if chance is not None:
        table.caption = f"chance accuracy {chance * 100:.1f}%"
    return table


def eval_tables(rows: list[dict], title: str, chance: float | None) -> list[Table]:
    """`fedmoe eval`: accuracy and format failures per (tier, top_k), then accuracy per family
    with one column per (tier, top_k), so the table stays narrow with many families."""
    summary = Table(show_header=True, header_style="bold", title=title)
    for name in ("tier", "top_k", "rank", "accuracy", "format failures"):
        summary.add_column(name, justify="left" if name == "tier" else "right")
    for row in rows:
        summary.add_row(str(row.get("tier")), _fmt(row.get("top_k"), "{}"), _fmt(row.get("lora_rank"), "{}"),
                        percent(row.get("accuracy")), percent(row.get("format_failures")))
    if chance is not None:
        summary.caption = f"chance accuracy {chance * 100:.1f}%; a format failure is scored wrong"
    families = sorted({f for row in rows for f in row.get("per_family", {})})
    per_family = Table(show_header=True, header_style="bold", title="accuracy per family (%)")
    per_family.add_column("family")
    for row in rows:
        per_family.add_column(f"{row.get('tier')} k={row.get('top_k')}", justify="right")
    for fam in families:
        cells = [row.get("per_family", {}).get(fam) for row in rows]
        per_family.add_row(fam, *[_fmt(None if c is None else 100 * c, "{:.1f}") for c in cells])
    return [summary, per_family]


# ---------------------------------------------------------------------------------------------
# Helpers


def _truncate(path: Path, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"resume offset must be >= 0, got {offset}")
    if not path.exists():
        return
    if path.stat().st_size < offset:
        # The checkpoint saw more than the file holds: the file was edited or lost lines.
        warnings.warn(f"{path}: shorter than the checkpoint's offset {offset}; keeping it as is")
        return
    os.truncate(path, offset)


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line so the next event does not glue onto it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def _summary_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # torch import is slow; only when asked

    return SummaryWriter(log_dir=str(log_dir))


def is_number(value: Any) -> bool:
    """A number read from a record (bool is not one)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(float(value))


def _scalars(record: dict):
    """(name, value) for numeric top-level fields and one level of nested dicts (per_family)."""
    for name, value in record.items():
        if name in _NOT_SCALARS:
            continue
        if _is_finite(value):
            yield name, float(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                if _is_finite(inner):
                    yield f"{name}/{key}", float(inner)


def _to_json(value: Any) -> Any:
    """Tensors and numpy values become plain numbers or lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _change(now: float | None, before: float | None) -> Text:
    if now is None or before is None:
        return Text("—", style="dim")
    delta = (now - before) * 100
    style = "green" if delta > 0 else "red" if delta < 0 else "dim"
    return Text(f"{delta:+.2f} pp", style=style)
