"""`fedmoe compare`'s runs: which to reuse, resume or (re)start, and the child processes that train them.

A run is reused (finished) or resumed (unfinished) only when the config it recorded
(RUN/config.yaml: the full resolved config `fedmoe run` writes) equals what the spec resolves to
now; otherwise compare stops before starting anything (exit 2, naming the run and the differing
keys), or with --force trains that run again. SIGTERM and SIGINT to compare reach the children
as SIGTERM, the graceful stop of federation/signals.py: each child keeps its completed rounds and
exits, compare waits for them and exits 128 + the signal, and the same command continues.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config import config_to_dict, load_config
from pipeline.errors import Interrupted, RetryableError, UserError

console = Console()


@dataclass
class Job:
    method: str
    seed: int
    run: Path
    command: list[str] | None  # fedmoe arguments; None: finished with the same config, reused
    log_suffix: str = ""  # its log is OUT/logs/<method>-seed<S><suffix>.log

    @property
    def log_name(self) -> str:
        return f"{self.method}-seed{self.seed}{self.log_suffix}.log"


def run_overrides(spec, method: str, seed: int, extra: list[str]) -> list[str]:
    return [*spec.overrides, *spec.methods[method], *extra, f"seed={seed}", "logging.progress=false"]


def plan_jobs(spec, out: Path, extra: list[str], force: bool) -> list[Job]:
    """Every (method, seed) run and what to do with it; reads only, so a refusal changes nothing."""
    jobs = []
    for method in spec.methods:
        for seed in spec.seeds:
            run = out / f"{method}-seed{seed}"
            sets = run_overrides(spec, method, seed, extra)
            start = ["run", "--config", str(spec.base), "--out", str(run), "--overwrite",
                     *[x for item in sets for x in ("--set", item)]]
            command = start
            if (run / "config.yaml").is_file():
                differ = recorded_differences(run, config_to_dict(load_config(spec.base, sets)))
                if differ and not force:
                    shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
                    raise UserError(f"{run}: made with another config ({shown} differ from the spec's); pass "
                                    "--force to train it again, or choose another --out")
                if not differ and _finished(run):
                    command = None
                elif not differ and (run / "metrics.jsonl").exists():
                    command = ["resume", str(run)]
            elif run.exists() and any(run.iterdir()):
                raise UserError(f"{run}: exists and is not a fedmoe run; move it away or choose another --out")
            jobs.append(Job(method, seed, run, command))
    return jobs


def recorded_differences(run: Path, want: dict) -> list[str]:
    """The dotted keys where the run's recorded config differs from `want`."""
    try:
        have = config_to_dict(load_config(run / "config.yaml"))
    except UserError:
        return ["config.yaml (unreadable)"]
    return _differences(want, have, "")


def _differences(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _finished(run: Path) -> bool:
    return (run / "final" / "adapter.safetensors").is_file() and (run / "report.md").is_file()


def launch(jobs: list[Job], out: Path, parallel: int, command: str, finished=None, what: str = "runs") -> None:
    """Train the jobs that need it, `parallel` at a time, each on cores / parallel threads.
    `finished(job)`: whether a job that exited did its work (default: its run finished)."""
    todo = [job for job in jobs if job.command is not None]
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[Job, subprocess.Popen]] = {}
    ended: list[tuple[Job, int]] = []
    stop: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    told: set[int] = set()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(what, total=len(jobs), completed=len(jobs) - len(todo))
            while (todo and not stop) or running:
                while todo and not stop and len(running) < parallel:
                    job = todo.pop(0)
                    with open(log_dir / job.log_name, "w") as log:
                        # Own session: a terminal's Ctrl-C reaches compare only, which stops the
                        # children gracefully instead of interrupting them mid-step.
                        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *job.command], env=env,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    running[proc.pid] = (job, proc)
                if stop:
                    _forward(running, told)
                time.sleep(0.2)
                for pid, (job, proc) in list(running.items()):
                    if proc.poll() is not None:
                        del running[pid]
                        ended.append((job, proc.returncode))
                        progress.advance(task)
    finally:
        if running:  # compare itself failed: the children stop too, resumable
            _forward(running, told)
            for _, proc in running.values():
                proc.wait()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop:
        raise Interrupted(f"compare stopped by {signal.Signals(stop[0]).name}; its runs kept their completed "
                          f"rounds: run `{command}` again to continue", 128 + stop[0])
    _report_failures(ended, log_dir, command, finished or (lambda job: _finished(job.run)))


def _forward(running: dict, told: set[int]) -> None:
    for pid, (_, proc) in running.items():
        if pid not in told and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            told.add(pid)


def _report_failures(ended: list[tuple[Job, int]], log_dir: Path, command: str, finished) -> None:
    """Exit 2 if a run needs the user (it exited 2: its own line says why), else exit 1 if one
    ended early (a crash, a signal, too few clients): running compare again resumes it."""
    permanent = [job for job, code in ended if code == 2]
    if permanent:
        names = ", ".join(f"{j.method}-seed{j.seed}" for j in permanent)
        why = _last_error(log_dir / permanent[0].log_name)
        raise UserError(f"compare: {names} failed: {why} (logs in {log_dir})")
    unfinished = [job for job, _ in ended if not finished(job)]
    if unfinished:
        names = ", ".join(f"{j.method}-seed{j.seed}" for j in unfinished)
        raise RetryableError(f"compare: {names} did not finish (logs in {log_dir}); run `{command}` "
                             "again to resume them")


def _last_error(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("fedmoe: ")]
    return lines[-1].removeprefix("fedmoe: ").removeprefix("error: ") if lines else "see its log"
