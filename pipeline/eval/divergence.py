"""Divergence guard: `train.on_divergence` (warn | stop), `divergence_factor`, `divergence_evals`.

A tier's evaluation is divergent when its loss is not finite, or exceeds `divergence_factor`
times the base model's (round 0) loss on that tier, or its accuracy is below chance while the
base model's was not (a base model below chance would make every round look divergent). A
tier divergent in `divergence_evals` evaluations in a row is reported: a `divergence` event in
metrics.jsonl (round, tier, reason, evals, action) each time, a console line when it starts, a
warning in report.md. With `stop`, the round is checkpointed and the run ends with one line
and exit 2. It stays resumable; a resumed run replays the streak from metrics.jsonl, so it
stops again at its next evaluation unless RUN/config.yaml was changed (a lower `train.lr`, or
`on_divergence: warn`). One rule per tier, since a low-budget tier may fail on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.truncate import CHARS_PER_TOKEN
from pipeline.errors import UserError
from pipeline.eval.metrics import read_metrics


class Diverged(UserError):
    """The guard stopped the run (exit 2); the run stays resumable from this round."""


@dataclass
class Guard:
    factor: float
    patience: int
    action: str  # warn | stop
    base: dict[str, dict] = field(default_factory=dict)  # tier -> its round-0 evaluation
    streak: dict[str, int] = field(default_factory=dict)  # tier -> divergent evaluations in a row

    @classmethod
    def for_run(cls, train, history: Path | None = None) -> "Guard":
        """`history`: a resumed run's directory, whose evaluations so far set the streaks."""
        guard = cls(train.divergence_factor, train.divergence_evals, train.on_divergence)
        for event in read_metrics(history) if history is not None else []:
            if event.get("event") == "eval" and "tier" in event:
                guard.assess(event)
        return guard

    def assess(self, row: dict) -> str | None:
        """Why this evaluation is divergent (None: it is not); updates the tier's streak."""
        tier = row["tier"]
        if row.get("round") == 0:
            self.base[tier], self.streak[tier] = row, 0
            return None
        reason = self._reason(row, self.base.get(tier, {}))
        self.streak[tier] = self.streak.get(tier, 0) + 1 if reason else 0
        return reason

    def _reason(self, row: dict, base: dict) -> str | None:
        loss, accuracy, chance = row.get("loss"), row.get("accuracy"), row.get("chance")
        # Generate mode scores no loss (null): then only the accuracy rule applies.
        if loss is not None and (not isinstance(loss, (int, float)) or not math.isfinite(loss)):
            return f"loss is {loss}"
        base_loss = base.get("loss")
        if (loss is not None and isinstance(base_loss, (int, float)) and math.isfinite(base_loss)
                and loss > self.factor * base_loss):
            return f"loss {loss:.4g} > {self.factor:g} x the base model's {base_loss:.4g}"
        base_accuracy = base.get("accuracy")
        if (isinstance(accuracy, (int, float)) and isinstance(chance, (int, float)) and accuracy < chance
                and not (isinstance(base_accuracy, (int, float)) and base_accuracy < chance)):
            return f"accuracy {accuracy:.1%} below chance {chance:.1%}"
        return None

    def observe(self, rows: list[dict]) -> list[dict]:
        """The `divergence` records of one evaluation: the tiers whose streak reached the limit."""
        found = []
        for row in rows:
            reason = self.assess(row)
            if reason and self.streak[row["tier"]] >= self.patience:
                found.append({"round": row["round"], "tier": row["tier"], "reason": reason,
                              "evals": self.streak[row["tier"]], "action": self.action})
        return found

    def after_eval(self, fed, rows: list[dict], console) -> str | None:
        """Log and print what `observe` found; on every rank, why the run must stop (None: go on)."""
        found = self.observe(rows)
        for record in found:
            fed.metrics.log("divergence", **record)
            if record["evals"] == self.patience:
                console.print(f"[bold yellow]warning[/]: round {record['round']}: tier {record['tier']} "
                              f"is diverging ({record['reason']}, {record['evals']} evaluations in a row)")
        stop = bool(found) and self.action == "stop"
        topology = fed.topology
        if self.action == "stop" and topology is not None and topology.distributed:
            from pipeline.federation.distributed import Watchdog

            # Only world rank 0 evaluates; the others wait for its verdict sleeping, not spinning.
            Watchdog(fed.cfg.federation.collective_timeout, topology.world, topology.rank).arrive(
                "the divergence check")
            stop = topology.world.bcast(stop, root=0)
        if not stop:
            return None
        what = (f" (tier {found[0]['tier']}: {found[0]['reason']}, {found[0]['evals']} evaluations in a row)"
                if found else "")  # the other ranks know only that world rank 0 saw it
        return (f"training diverged{what}; the run is resumable: lower train.lr or set "
                f"train.on_divergence: warn in {fed.run_dir}/config.yaml, then `fedmoe resume {fed.run_dir}`")


def report_lines(events: list[dict]) -> list[str]:
    """report.md's warnings: divergence per tier, records cut before tokenization."""
    lines = []
    spans: dict[str, list[dict]] = {}
    for e in events:
        if e.get("event") == "divergence":
            spans.setdefault(str(e.get("tier")), []).append(e)
    for tier, seen in spans.items():
        first, last = seen[0], seen[-1]
        lines.append(f"- **divergence** of tier {tier}, rounds {first.get('round')}-{last.get('round')}: "
                     f"{last.get('reason')} (train.on_divergence: {last.get('action')})")
    cut = [e for e in events if e.get("event") == "data" and e.get("truncated")]
    if cut:
        lines.append(f"- {cut[-1]['truncated']} data record(s) were cut before tokenization (longer "
                     f"than {CHARS_PER_TOKEN} characters per token of the length limit)")
    return ["## Warnings", ""] + lines + [""] if lines else []
