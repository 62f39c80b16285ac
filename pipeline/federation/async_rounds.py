"""The asynchronous run (`federation.mode: async`): clients train from the version they were
dispatched with and report on a clock; the server aggregates stale updates (docs/async.md).

The events come from clock.run_events: on the virtual clock they follow from the config and the
seed alone; on the wall clock each dispatch's duration is its measured training time
(async_durations.py). A client is trained when it is dispatched,
from the current global adapters, and its update waits until its arrival and the aggregation
that takes it. Under MPI each client group trains its own clients (a fixed client -> group
map), and every aggregation is one collective over the groups' contributions, as a sync
round's is. A block of `clients_per_round` arrivals plays the part of a round: the run
evaluates and checkpoints at its end. The checkpoint holds the global adapters and every older
version an in-flight or buffered update trained from; a resumed run trains those updates again
from their versions (their seeds are their dispatch numbers), so it ends bitwise as the
uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.algorithms.asynchronous import AsyncStrategy, Buffered, is_async
from pipeline.algorithms.base import STRATEGIES, ClientUpdate
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.federation import async_durations, clock, rounds, signals
from pipeline.federation.assembly import Federation
from pipeline.federation.callbacks import ProgressDisplay
from pipeline.federation.collectives import PackedSums
from pipeline.federation.distributed import reduce_round
from pipeline.federation.server_ops import ServerOps


def check_mode(cfg: Config) -> None:
    """The method fits the mode, and its buffer fits the federation (ConfigError, exit 2)."""
    name, fed = cfg.algorithm.name, cfg.federation
    cls = STRATEGIES.get(name)
    if cls is None:
        return  # check_method names the unknown method
    asynchronous = sorted(n for n, c in STRATEGIES.items() if is_async(c))
    if fed.mode == "async" and not is_async(cls):
        raise ConfigError(f"algorithm.name: {name} is synchronous; federation.mode=async needs one of "
                          f"{', '.join(asynchronous)}")
    if fed.mode == "sync" and is_async(cls):
        raise ConfigError(f"algorithm.name: {name} is asynchronous; set federation.mode=async")
    if fed.mode == "async":
        k = cfg.algorithm.options.get("buffer_size")
        if isinstance(k, int) and not isinstance(k, bool) and k > fed.clients:
            raise ConfigError(f"algorithm.options.buffer_size: {k} exceeds federation.clients={fed.clients}")
        if fed.placement == "queue":
            raise ConfigError("federation.placement: queue pulls the clients of a sync round; async runs "
                              "dispatch each client to a fixed group (use tier or balanced)")
        big = [i for i, t in enumerate(cfg.tiers) if t.ep_size > 1]
        if big:
            raise ConfigError(f"tiers.{big[0]}.ep_size: must be 1 with federation.mode=async "
                              "(the async methods aggregate whole expert tensors)")
        if name == "alignfed" and cfg.deepspeed.zero_stage == 3:
            raise ConfigError("deepspeed.zero_stage: alignfed needs 0, 1 or 2 (its feature loss runs a "
                              "plain forward of the dispatched version)")
        if fed.replay is not None:
            if fed.clock != "virtual":
                raise ConfigError("federation.replay: replays recorded durations on the virtual clock; "
                                  "set federation.clock=virtual")
            need = fed.rounds * fed.clients_per_round
            have = len(async_durations.recorded(Path(fed.replay)))
            if have < need:
                raise ConfigError(f"federation.replay: {fed.replay} records {have} dispatches, the run needs {need}")


class AsyncLoop:
    """Walks the schedule: trains this group's dispatches, aggregates, evaluates, checkpoints."""

    def __init__(self, fed: Federation, progress: ProgressDisplay | None):
        self.fed, self.progress = fed, progress
        self.strategy: AsyncStrategy = fed.strategy
        self.dispatched: dict[int, clock.Dispatch] = {}  # in flight
        self.round = 1  # the block being worked on
        self.trained: dict[int, ClientUpdate] = {}  # this group's updates not yet aggregated
        self.buffer: list[clock.Arrival] = []
        self.block: list[ClientUpdate] = []  # the block's aggregated updates (metadata), for tier stats
        self.load: dict[str, torch.Tensor] = {}
        self.owner = self._owners()

    def _owners(self) -> dict[int, int]:
        topology = self.fed.topology
        n = self.fed.cfg.federation.clients
        if topology is None or not topology.distributed:
            return dict.fromkeys(range(n), 0)
        groups = topology.layout.assign(list(range(n)), [t.name for t in self.fed.client_tiers])
        return {c: g for g, clients in enumerate(groups) for c in clients}

    def mine(self, client: int) -> bool:
        topology = self.fed.topology
        return self.owner[client] == (topology.group.index if topology is not None and topology.distributed else 0)

    def resume_at(self, position: clock.Position) -> None:
        """Train again the updates in flight or buffered at the checkpoint, from their versions."""
        self.buffer = list(position.buffered)
        self.dispatched = {d.seq: d for d in position.in_flight}
        again = [clock.Dispatch(a.seq, a.client, 0.0, a.base_version) for a in position.buffered]
        for d in sorted(again + position.in_flight, key=lambda d: d.seq):
            if self.mine(d.client):
                update = self.train(d)
                if update is not None:
                    self.trained[d.seq] = update

    def train(self, d: clock.Dispatch) -> ClientUpdate | None:
        strategy = self.strategy
        current = strategy.global_adapters
        strategy.global_adapters = strategy.versions[d.version]  # the version it was dispatched with
        try:
            with self.fed.clock("train"):
                update = rounds.train_client(self.fed, d.client, d.seq, self.progress)
        except (RuntimeError, ValueError, FloatingPointError) as exc:  # one bad client must not end the run
            self.fed.metrics.log("reject", round=self.round, seq=d.seq, client=d.client, reason=f"client raised: {exc}")
            return None
        finally:
            strategy.global_adapters = current
        self.fed.metrics.log("client", round=self.round, seq=d.seq, client=d.client, version=d.version,
                             tier=update.tier.name, top_k=update.top_k, lora_rank=update.lora_rank,
                             n_samples=update.n_samples, **update.metrics)
        return update

    def dispatch(self, d: clock.Dispatch) -> None:
        self.strategy.versions.setdefault(d.version, self.strategy.global_adapters)
        if self.mine(d.client):
            update = self.train(d)
            if update is not None:
                self.trained[d.seq] = update

    def aggregate(self, g: clock.Aggregation) -> None:
        with self.fed.clock("aggregate"):
            self._aggregate(g)

    def _aggregate(self, g: clock.Aggregation) -> None:
        fed, strategy = self.fed, self.strategy
        current = g.version - 1
        sums = PackedSums(fed.sums_layout)
        load: dict[str, torch.Tensor] = {}
        accepted, records = [], []
        arrivals = {a.seq: a for a in self.buffer}
        for seq in g.members:
            update = self.trained.pop(seq, None)
            if update is None:  # another group's
                continue
            a = arrivals[seq]
            reason = rounds.check_update(update, strategy.global_adapters)
            if reason:
                fed.metrics.log("reject", round=self.round, seq=seq, client=a.client, reason=reason)
                continue
            item = Buffered(update, a.base_version, current - a.base_version, a.uploads)
            sums.add(strategy.arrival_contribution(item, strategy.versions[a.base_version]))
            load[update.tier.name] = load.get(update.tier.name, 0) + update.expert_token_counts
            accepted.append(seq)
            records.append(rounds.update_record(update))
        packed = sums
        sums, load, accepted, records = reduce_round(fed.topology, fed.cfg.federation.collective_timeout,
                                                     fed.metrics, packed, load, accepted, records)
        fed.sums_layout = packed.spec
        records = [rounds.update_from_record(r) for r in records]  # without tensors: for the block's tier stats
        own = {}
        if accepted:
            own = strategy.aggregate(sums, {a.base_version: strategy.versions[a.base_version]
                                            for a in self.buffer}, ServerOps(fed))
        strategy.version = g.version
        members = [arrivals[s] for s in g.members]
        fed.metrics.log("aggregate", version=g.version, virtual_time=g.time, reason=g.reason,
                        seqs=list(g.members), clients=[a.client for a in members],
                        tiers=[fed.client_tiers[a.client].name for a in members],
                        staleness=[current - a.base_version for a in members],
                        accepted=sorted(accepted), **({"strategy": own} if own else {}))
        self.block.extend(records)
        for tier, counts in load.items():
            self.load[tier] = self.load.get(tier, 0) + counts
        self.buffer = []
        self.prune()

    def prune(self) -> None:
        """Keep the versions that in-flight or buffered updates trained from, and the current one."""
        strategy = self.strategy
        strategy.versions[strategy.version] = strategy.global_adapters
        needed = ({strategy.version} | {a.base_version for a in self.buffer}
                  | {d.version for d in self.dispatched.values()})
        strategy.versions = {v: t for v, t in strategy.versions.items() if v in needed}

    def step(self, event: clock.Event) -> None:
        if isinstance(event, clock.Dispatch):
            self.dispatched[event.seq] = event
            self.dispatch(event)
        elif isinstance(event, clock.Arrival):
            self.dispatched.pop(event.seq)
            self.buffer.append(event)
        elif isinstance(event, clock.Aggregation):
            self.aggregate(event)

    def block_stats(self) -> None:
        if self.block:
            self.fed.tier_stats = rounds.tier_training_stats(self.fed, self.block, self.load)
        self.block, self.load = [], {}


def execute(cfg: Config, run_dir: Path, start_round: int, resume_offset: int | None,
            state: Path | None, parts=None, started=None) -> Path | None:
    """As rounds.execute (the same setup, resume and callbacks), for federation.mode=async."""
    return rounds.execute(cfg, run_dir, start_round, resume_offset, state, parts, started,
                          body=_blocks, mode="async")


def _blocks(fed: Federation, start_round: int, fresh: bool, progress, callbacks, started) -> str:
    cfg, strategy = fed.cfg, fed.strategy
    steps = rounds.RunSteps(fed, fresh, callbacks)
    loop = AsyncLoop(fed, progress)
    known = {}
    if cfg.federation.replay is not None:
        known = async_durations.recorded(Path(cfg.federation.replay))
    elif cfg.federation.clock == "wall" and not fresh and fed.writes:
        known = async_durations.recorded(fed.run_dir)  # its own, up to the checkpoint
    if fed.topology is not None and fed.topology.distributed:
        known = fed.topology.world.bcast(known, root=0)
    durations = async_durations.Durations(fed, loop, known)
    per_round = cfg.federation.clients_per_round
    events = clock.run_events(durations, cfg.federation.clients, cfg.federation.concurrency or per_round,
                              cfg.federation.rounds * per_round, per_round, strategy.buffer_size,
                              strategy.t_max, cfg.seed)
    if fresh:
        strategy.version, strategy.versions = 0, {0: strategy.global_adapters}
        fed.metrics.log("block", round=0, virtual_time=0.0, version=0)
        start_round = steps.begin(started)
    durations.replaying = True  # the events before the checkpoint, again: nothing trained or logged
    done: list[clock.Event] = []
    for event in events if start_round > 1 else ():
        done.append(event)
        if isinstance(event, clock.Boundary) and event.round == start_round - 1:
            break
    at = clock.position(done, start_round - 1)
    durations.replaying = False
    if at.version != strategy.version:
        raise ConfigError(f"the checkpoint holds version {strategy.version}, the schedule says {at.version} "
                          "at its block: the run's config.yaml was edited")
    loop.resume_at(at)
    steps.rounds_start(start_round)
    start = time.perf_counter()
    loop.round = start_round
    for event in events:
        if not isinstance(event, clock.Boundary):
            loop.step(event)
            continue
        round_ = event.round
        loop.round = round_ + 1
        loop.block_stats()
        fed.metrics.log("round", round=round_, seconds=time.perf_counter() - start, tiers=fed.tier_stats)
        fed.metrics.log("block", round=round_, virtual_time=event.time, version=event.version)
        start = time.perf_counter()
        status = steps.round_done(
            round_, stop=lambda: signals.any_stopped(fed.topology, cfg.federation.collective_timeout))
        if status is not None:
            return status
    return steps.finish()
