"""What a run shows and closes, apart from what it computes: callbacks of `rounds.execute`.

Each hook is called on every rank, in list order; the default does nothing. `on_end` follows
the run's last metrics event (status finished, stopped or diverged); `on_exit` follows every
outcome, an exception included.
"""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.eval.metrics import round_table

console = Console()


class Callback:
    def on_rounds_start(self, fed, start_round: int) -> None:
        """Before the first round this process trains (after a fresh run's round 0)."""

    def on_eval(self, fed, round_: int, rows: list[dict]) -> None:
        """After an evaluation (round 0: the base model); `rows` is empty off the evaluating ranks."""

    def on_round_end(self, fed, round_: int) -> None:
        """After a round's evaluation and checkpoint."""

    def on_end(self, fed, status: str, round_: int) -> None:
        """After the run's last event: status finished, stopped or diverged after `round_`."""

    def on_exit(self, fed) -> None:
        """Whatever the outcome, once the run returns or raises."""


class ProgressDisplay(Callback):
    """The rounds bar, a bar per client's local steps, and each evaluation's table
    (`logging.progress`, world rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.previous: dict[str, float] = {}  # tier -> the last evaluation's accuracy
        self.bar = (Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=False) if enabled else None)
        self.task = None

    def on_rounds_start(self, fed, start_round: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("rounds", total=fed.cfg.federation.rounds, completed=start_round - 1)

    def on_eval(self, fed, round_: int, rows: list[dict]) -> None:
        if self.enabled:
            table = round_table(rows, self.previous or None, fed.data.chance)
            table.title = f"round {round_}" if round_ else "base model (round 0)"
            console.print(table)
        self.previous.update({r["tier"]: r["accuracy"] for r in rows})

    def on_round_end(self, fed, round_: int) -> None:
        if self.bar is not None:
            used = fed.placement.last_utilisation if getattr(fed, "placement", None) else None
            label = "rounds" if used is None else f"rounds (GPU util. {used:.0%})"  # the last round's
            self.bar.update(self.task, completed=round_, description=label)

    def client(self, description: str, steps: int):
        """A bar for one client's local training: returns (on_step, done)."""
        if self.bar is None:
            return None, lambda: None
        task = self.bar.add_task(f"  {description}", total=steps)
        return (lambda s, loss: self.bar.update(task, completed=s)), (lambda: self.bar.remove_task(task))

    def on_exit(self, fed) -> None:
        if self.bar is not None:
            self.bar.stop()


class Teardown(Callback):
    """Closes metrics.jsonl and this process's torch.distributed world (NCCL warns about leaked
    resources otherwise)."""

    def on_end(self, fed, status: str, round_: int) -> None:
        fed.metrics.close()
        if torch.distributed.is_initialized():
            from deepspeed.comm import comm as ds_comm

            if ds_comm.cdb is not None:  # also drops DeepSpeed's cached groups: a later run
                ds_comm.destroy_process_group()  # in this process (a notebook) starts afresh
            else:
                torch.distributed.destroy_process_group()


class Report(Callback):
    """report.md once the run finished or diverged, after metrics.jsonl is closed; how to go on
    once it stopped (world rank 0)."""

    def on_end(self, fed, status: str, round_: int) -> None:
        if not fed.writes:
            return
        if status == "stopped":
            print(f"fedmoe: stopped by a signal after round {round_}; `fedmoe resume {fed.run_dir}` "
                  "continues from it", flush=True)
            return
        from pipeline.eval.report import write_report  # matplotlib: only when a report is written

        report = write_report(fed.run_dir)
        if status == "finished":
            final = Path(fed.run_dir) / "final"
            console.print(f"[bold]done[/]: adapters in {final}/adapter.safetensors, report in {report}")
