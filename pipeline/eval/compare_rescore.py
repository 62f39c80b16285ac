"""`fedmoe compare --mode MODE`: score every run's final checkpoint again in another evaluation
mode (generation and answer extraction instead of option log-likelihoods, or back), so that one
comparison is reported in both modes without training anything twice.

Each score is `fedmoe eval RUN --mode MODE --json RUN/eval-MODE.json` in its own process (`--jobs`
at a time, threads split evenly, as the training runs); a file whose rows are of the run's final
round and in that mode is reused, so a stopped rescoring continues where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.eval.compare_runs import Job, launch
from pipeline.eval.summary import load_summary


def score_file(run: Path, mode: str) -> Path:
    return run / f"eval-{mode}.json"


def _final_round(run: Path) -> int | None:
    rounds = {t["final_round"] for t in load_summary(run)["tiers"].values()}
    return rounds.pop() if len(rounds) == 1 else None


def read_scores(run: Path, mode: str) -> dict[str, dict] | None:
    """Tier -> its row (accuracy, format_failures, ...) of the run's final round in `mode`, or None
    when the file is missing, unreadable or of another round or mode."""
    try:
        rows = json.loads(score_file(run, mode).read_text())
    except (OSError, ValueError):
        return None
    final = _final_round(run)
    if not isinstance(rows, list) or not rows or final is None:
        return None
    if any(not isinstance(r, dict) or r.get("round") != final or r.get("mode") != mode for r in rows):
        return None
    return {r["tier"]: r for r in rows}


def rescore(runs: dict[tuple[str, int], Path], mode: str, out: Path, jobs: int,
            command: str) -> dict[tuple[str, int], dict[str, dict]]:
    """(method, seed) -> tier -> the final checkpoint's row in `mode`, scoring the runs that lack one."""
    todo = [Job(m, s, run, ["eval", str(run), "--mode", mode, "--json", str(score_file(run, mode))],
                log_suffix=f"-eval-{mode}")
            for (m, s), run in runs.items() if read_scores(run, mode) is None]
    if todo:
        launch(todo, out, jobs, command, finished=lambda job: read_scores(job.run, mode) is not None,
               what=f"{mode} scoring")
    return {key: read_scores(run, mode) for key, run in runs.items()}
