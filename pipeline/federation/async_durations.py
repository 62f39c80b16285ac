"""How long each dispatched client takes, for the event generator (clock.run_events).

- virtual: `local_steps * step_cost(tier) / speed(tier)` times the seeded jitter (docs/async.md);
- wall: the seconds its local training really took on the group that trained it (under MPI the
  owning group's leader broadcasts them), so updates are applied in their real arrival order;
- recorded: durations a run already logged (`dispatch` events of metrics.jsonl): a resumed wall
  run replays its own up to its checkpoint, and `federation.replay` replays another run's on the
  virtual clock, which reproduces that run.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.federation import clock


def recorded(path: Path) -> dict[int, float]:
    """seq -> duration from the `dispatch` events of a metrics.jsonl (or of a run directory's)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"federation.replay: {path}: file not found")
    out = {}
    try:
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "dispatch":
                out[int(event["seq"])] = float(event["duration"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"federation.replay: {path}: not a fedmoe metrics.jsonl") from None
    return out


def client_costs(fed) -> list[float]:
    """Each client's virtual duration before jitter: local steps * step cost / speed of its tier."""
    cfg = fed.cfg
    costs = clock.tier_step_costs(fed.engine.model.config, fed.tiers, cfg.model.lora.rank, cfg.train.max_length,
                                  cfg.model.lora.experts, cfg.model.lora.attention)
    return [cfg.train.local_steps * costs[t.index] / cfg.tiers[t.index].speed for t in fed.client_tiers]


class Durations:
    """`duration(seq, client)` for clock.run_events; logs each as a `dispatch` event."""

    def __init__(self, fed, loop, known: dict[int, float]):
        self.fed, self.loop, self.known = fed, loop, dict(known)
        self.wall = fed.cfg.federation.clock == "wall"
        self.costs = None if self.wall else client_costs(fed)
        self.replaying = False  # regenerating the events before a checkpoint: nothing is logged

    def __call__(self, seq: int, client: int) -> float:
        cfg = self.fed.cfg
        if seq in self.known:
            value = self.known[seq]
        elif not self.wall:
            value = self.costs[client] * clock.durations_factor(cfg.seed, seq, cfg.federation.jitter)
        elif self.replaying:
            raise ConfigError(f"dispatch {seq} has no recorded duration: the run's metrics.jsonl lacks it")
        else:
            value = self.measured(seq, client)
        if not self.replaying:
            d = self.loop.dispatched.get(seq)
            self.fed.metrics.log("dispatch", seq=seq, client=client, duration=value,
                                 version=d.version if d else None, virtual_time=d.time if d else None)
        return value

    def measured(self, seq: int, client: int) -> float:
        topology = self.fed.topology
        update = self.loop.trained.get(seq)
        value = float(update.metrics["seconds"]) if update is not None else 0.0  # 0: rejected, arrives at once
        if topology is None or not topology.distributed:
            return value
        root = topology.layout.groups[self.loop.owner[client]].ranks[0]
        return float(topology.world.bcast(value, root=root))
