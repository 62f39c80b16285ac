"""The synchronous federated run: sample, train each client, aggregate, evaluate, checkpoint.

One process here; the same round loop runs per client group under MPI (federation/topology).
Rounds are numbered from 1; round 0 is the base model's evaluation and the first checkpoint.
What the run shows and closes (progress, report, teardown) are callbacks (callbacks.py).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.algorithms import ClientUpdate
from pipeline.config import Config
from pipeline.data.truncate import CHARS_PER_TOKEN
from pipeline.errors import RetryableError
from pipeline.eval.balance import balance_stats
from pipeline.eval.divergence import Diverged, Guard
from pipeline.federation import assembly, evaluation, placement, signals, timing
from pipeline.federation.assembly import Federation
from pipeline.federation.callbacks import Callback, ProgressDisplay, Report, Teardown, console
from pipeline.federation.collectives import PackedSums
from pipeline.federation.distributed import reduce_round
from pipeline.federation.expert_shards import is_expert_key
from pipeline.federation.model_ops import ClientOps, ModelOps
from pipeline.federation.outputs import save_round, write_final
from pipeline.federation.sampling import LOCAL_DATA, derive_seed, local_batches, sample_clients
from pipeline.model import flops_per_token, set_base_delta


class RoundFailed(RetryableError):
    """Too few clients reported; the run stays resumable from its last checkpoint."""


def train_client(fed: Federation, client: int, round_: int, progress: ProgressDisplay | None) -> ClientUpdate:
    cfg, strategy = fed.cfg, fed.strategy
    seed = derive_seed(cfg.seed, LOCAL_DATA, round_, client)
    plan = strategy.plan(client, round_, fed.client_tiers[client])
    device = fed.engine.device
    group = fed.topology.group.index if fed.topology is not None else 0
    checkpointing = fed.placement is not None and fed.placement.checkpointing(
        plan.tier.index, group, device.type, cfg.train.activation_checkpointing)
    fed.engine.set_checkpointing(checkpointing)  # a method's calibration pass below runs under it too
    plan = strategy.prepare_client(plan, ClientOps(fed, client, round_))
    indices = fed.data.client_indices[client]
    batches = (fed.data.train_batch(b) for b in
               local_batches(indices, cfg.train.local_steps, cfg.train.batch_size, seed))
    strategy.configure_model(fed.engine.model, plan)
    on_step, done = (progress.client(f"client {client} ({plan.tier.name}, k={plan.top_k})",
                                     cfg.train.local_steps) if progress is not None else (None, None))
    timing.reset_peak_memory(device)
    result = fed.engine.train(
        plan.adapters, strategy.setting(plan.top_k, plan.lora_rank), batches,
        extra_loss=lambda m: strategy.extra_loss(m, plan),
        after_backward=lambda m: strategy.after_backward(m, plan),
        on_step=on_step, checkpointing=checkpointing)
    if done is not None:
        done()
    counts = result.expert_token_counts
    tokens = int(round(counts[0].sum().item() / max(plan.top_k, 1)))
    return ClientUpdate(client, round_, plan.tier, plan.top_k, plan.lora_rank, result.adapters,
                        n_samples=len(indices), expert_token_counts=counts, tokens=tokens,
                        metrics={"train_loss": sum(result.losses) / len(result.losses),
                                 "final_loss": result.losses[-1], "seconds": result.seconds,
                                 "steps": len(result.losses), "losses": result.losses,
                                 "peak_memory_gib": timing.peak_memory_gib(device),
                                 "group": group, "checkpointing": checkpointing},
                        extras=strategy.client_extras(fed.engine.model, plan))


def check_update(update: ClientUpdate, expected: dict[str, torch.Tensor]) -> str | None:
    """Why an update must be rejected (wrong keys/shapes, non-finite values), else None."""
    if set(update.adapters) != set(expected):
        missing = sorted(set(expected) ^ set(update.adapters))
        return f"adapter keys differ from the plan's: {missing[:3]}"
    for name, ref in expected.items():
        value = update.adapters[name]
        if value.shape != ref.shape:
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if not torch.isfinite(value).all():
            return f"{name}: non-finite values"
    return None


def run_round(fed: Federation, round_: int, progress: ProgressDisplay | None) -> dict:
    cfg, strategy = fed.cfg, fed.strategy
    start = time.perf_counter()
    clients = sample_clients(cfg.federation.clients, cfg.federation.clients_per_round, cfg.seed, round_)
    strategy.prepare_round(ModelOps(fed), round_)
    set_base_delta(fed.engine.model, strategy.base_delta())
    sums = PackedSums(fed.sums_layout, packed=(lambda k: not is_expert_key(k)) if fed.shards else None)
    load: dict[str, torch.Tensor] = {}
    accepted, updates = [], []
    plan_shapes = strategy.global_adapters  # updates must match the global adapters' keys and shapes
    mine = placement.my_clients(fed, clients, round_)  # under MPI: this group's share (federation.placement)
    offset = fed.metrics.offset()  # the record of the completed rounds, should this one be abandoned
    for client in mine:
        if signals.requested():  # SIGUSR1/SIGTERM: the clients not started yet wait for the resumed run
            break
        try:
            with fed.clock("train"):
                update = train_client(fed, client, round_, progress)
        except (RuntimeError, ValueError, FloatingPointError) as exc:  # one bad client must not end the round
            fed.metrics.log("reject", round=round_, client=client, reason=f"client raised: {exc}")
            continue
        reason = check_update(update, plan_shapes)
        if reason:
            fed.metrics.log("reject", round=round_, client=client, reason=reason)
            continue
        accepted.append(client)
        updates.append(update)
        sums.add(strategy.contribution(update))
        tier = update.tier.name
        load[tier] = load.get(tier, 0) + update.expert_token_counts
        fed.metrics.log("client", round=round_, client=client, tier=tier, top_k=update.top_k,
                        lora_rank=update.lora_rank, n_samples=update.n_samples, **update.metrics)
    with fed.clock("aggregate"):  # waiting for the other groups, then the sums
        if signals.any_stopped(fed.topology, cfg.federation.collective_timeout):  # any rank stopped: drop the round
            raise signals.Preempted(round_ - 1, offset)
        packed = sums  # every group's sums, loads and updates, identical on all ranks
        distributed = fed.topology is not None and fed.topology.distributed
        sums, load, accepted, records = reduce_round(
            fed.topology, cfg.federation.collective_timeout, fed.metrics, packed, load, accepted,
            [update_record(u) for u in updates] if distributed else updates, fed.shards)
        updates = sorted(map(update_from_record, records), key=lambda u: u.client_id) if distributed else records
        fed.sums_layout = packed.spec
        if len(accepted) < cfg.federation.min_clients:
            raise RoundFailed(f"round {round_}: {len(accepted)} of {len(clients)} clients reported, "
                              f"federation.min_clients={cfg.federation.min_clients}")
        own = strategy.finalize(sums)  # the method's metrics of the new state
    fed.tier_stats = tier_training_stats(fed, updates, load)
    seconds = time.perf_counter() - start
    placed = placement.observe(fed, updates, seconds)  # measured busy time per group; the cost model learns
    fed.metrics.log("round", round=round_, seconds=seconds, clients=accepted,
                    expert_load={t: v.tolist() for t, v in load.items()}, tiers=fed.tier_stats,
                    **({"strategy": own} if own else {}), **({"placement": placed} if placed else {}))
    return load


def update_record(update: ClientUpdate) -> ClientUpdate:
    """An update without its tensors, for the round's metadata gather (counts as a numpy array)."""
    return dataclasses.replace(update, adapters={}, extras={},
                               expert_token_counts=update.expert_token_counts.numpy())


def update_from_record(update: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(update, expert_token_counts=torch.from_numpy(update.expert_token_counts))


def tier_training_stats(fed: Federation, updates: list[ClientUpdate], load: dict) -> dict:
    """Per tier: training FLOPs per token counted from the routed experts, its ratio to the
    costliest tier, measured seconds per local step, and expert-load balance."""
    mcfg = fed.engine.model.config
    lora = fed.cfg.model.lora
    stats: dict[str, dict] = {}
    for tier in fed.tiers:
        mine = [u for u in updates if u.tier.name == tier.name]
        if not mine:
            continue
        tokens = sum(u.tokens for u in mine)
        routed = sum(u.expert_token_counts.sum(dim=1).mean().item() for u in mine)  # per layer
        steps = sum(u.metrics["steps"] for u in mine)
        seq_len = max(1, round(tokens / (steps * fed.cfg.train.batch_size)))
        flops = flops_per_token(mcfg, top_k=routed / max(tokens, 1), lora_rank=mine[0].lora_rank,
                                seq_len=seq_len, expert_lora=lora.experts, attention_lora=lora.attention)
        balance = balance_stats(load[tier.name].numpy())
        stats[tier.name] = {"train_flops_per_token": flops["train"],
                            "step_seconds": sum(u.metrics["seconds"] for u in mine) / steps,
                            "load_cv": balance["cv"], "load_entropy": balance["entropy"],
                            "dead_expert_share": balance["low_load_share"]}
    top = max((v["train_flops_per_token"] for v in stats.values()), default=0.0)
    for v in stats.values():
        v["flops_vs_top"] = v["train_flops_per_token"] / top if top else None
    return stats


# ---------------------------------------------------------------------------------------------
# The run


def execute(cfg: Config, run_dir: Path, start_round: int, resume_offset: int | None,
            state: Path | None, parts=None, started=None, body=None, **record) -> Path | None:
    """Run rounds start_round..rounds; `state` is the checkpoint to resume (None: a fresh run),
    of which a rank with expert shards reads only its experts' rows. `started()` is called
    once a fresh run's round 0 is saved. `body` replaces the synchronous round loop (the async
    one, async_rounds.py); `record` adds fields to the run's start record."""
    fed = assembly.build(cfg, run_dir, resume_offset, parts)
    if state is not None:
        tensors, meta = checkpoint.load_checkpoint(state, fed.shards.range if fed.shards else None)
        fed.strategy.load_state_dict({"tensors": tensors, "meta": meta["strategy"]})
        fed.strategy.restore_files(state)
        if fed.placement is not None:  # the cost model as the checkpointed round left it
            fed.placement.load_state_dict(meta.get("placement"))
    # The bits are reproducible for a given thread count and library versions: record both.
    fed.metrics.log("run", status="resumed" if state else "started", round=start_round, **record,
                    threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled(),
                    torch=torch.__version__, load_seconds=timing.process_seconds())
    log_data(fed)
    progress = ProgressDisplay(cfg.logging.progress and fed.writes)
    callbacks: list[Callback] = [progress, Teardown(), Report()]
    try:
        status = (body or _rounds)(fed, start_round, state is None, progress, callbacks, started)
    finally:
        for cb in callbacks:
            cb.on_exit(fed)
    return fed.run_dir / "final" if status == "finished" else None


class RunSteps:
    """What the sync round loop and the async block loop share: round 0, each round's evaluation
    (with the divergence guard) and checkpoint, the callbacks, and the run's closing record."""

    def __init__(self, fed: Federation, fresh: bool, callbacks: list[Callback]):
        self.fed, self.callbacks = fed, callbacks
        self.guard = Guard.for_run(fed.cfg.train, fed.run_dir if not fresh and fed.writes else None)

    def begin(self, started) -> int:
        """A fresh run's round 0: the base model's evaluation (the divergence guard's reference)
        and first checkpoint; the round the loop starts from."""
        self.evaluated(0)
        self.checkpoint(0)
        if started is not None and self.fed.writes:
            started()
        return 1

    def rounds_start(self, start_round: int) -> None:
        for cb in self.callbacks:
            cb.on_rounds_start(self.fed, start_round)

    def evaluated(self, round_: int) -> str | None:
        """The round's evaluation; why the run diverged, if it did."""
        with self.fed.clock("evaluate"):
            rows = evaluation.evaluate_round(self.fed, round_)
        for cb in self.callbacks:
            cb.on_eval(self.fed, round_, rows)
        return self.guard.after_eval(self.fed, rows, console)

    def round_done(self, round_: int, stop=None) -> str | None:
        """Evaluate and checkpoint as configured; `stop()` (async: a rank was signalled) is asked
        after the evaluation. The run's end status when it stops here, else None."""
        fed, cfg = self.fed, self.fed.cfg
        rounds = cfg.federation.rounds
        diverged = None
        if round_ % cfg.eval.every == 0 or round_ == rounds:
            diverged = self.evaluated(round_)
        stopped = stop() if stop is not None else False
        if round_ % cfg.checkpoint.every == 0 or round_ == rounds or diverged or stopped:
            self.checkpoint(round_)
        else:
            self.log_timing(round_)
        if diverged:  # train.on_divergence: stop; resumable from this round's checkpoint
            self.end("diverged", round_)
            raise Diverged(f"round {round_}: {diverged}")
        if stopped and round_ < rounds:
            return self.end("stopped", round_)
        for cb in self.callbacks:
            cb.on_round_end(fed, round_)
        return None

    def checkpoint(self, round_: int) -> None:
        # The phases so far go in before the checkpoint, whose metrics offset then keeps them;
        # the checkpoint's own seconds follow it (a run resumed from it lacks those alone).
        self.log_timing(round_)
        with self.fed.clock("checkpoint"):
            save_round(self.fed, round_)
        self.log_timing(round_)

    def log_timing(self, round_: int) -> None:
        """This rank's phase seconds since the last `timing` event (federation/timing.py)."""
        seconds = self.fed.clock.take()
        if seconds:
            self.fed.metrics.log("timing", round=round_, **seconds)

    def finish(self) -> str:
        with self.fed.clock("export"):
            write_final(self.fed)
        self.log_timing(self.fed.cfg.federation.rounds)
        return self.end("finished", self.fed.cfg.federation.rounds)

    def end(self, status: str, round_: int) -> str:
        self.fed.metrics.log("run", status=status, round=round_)
        for cb in self.callbacks:
            cb.on_end(self.fed, status, round_)
        return status


def _rounds(fed: Federation, start_round: int, fresh: bool, progress: ProgressDisplay,
            callbacks: list[Callback], started) -> str:
    steps = RunSteps(fed, fresh, callbacks)
    if fresh:
        start_round = steps.begin(started)
    steps.rounds_start(start_round)
    for round_ in range(start_round, fed.cfg.federation.rounds + 1):
        try:
            run_round(fed, round_, progress)
        except signals.Preempted as stop:  # SIGUSR1/SIGTERM: keep the completed rounds, return (exit 0)
            signals.pause(fed, stop, save_round)
            return steps.end("stopped", stop.completed)
        steps.round_done(round_)
    return steps.finish()


def log_data(fed: Federation) -> None:
    """How much data the run has, and how many records were cut before tokenization."""
    data = fed.data
    fed.metrics.log("data", train=len(data.train_examples), eval=len(data.eval_examples),
                    truncated=data.truncated)
    if data.truncated and fed.writes:
        console.print(f"[bold yellow]warning[/]: {data.truncated} data record(s) cut before tokenization "
                      f"to their last {CHARS_PER_TOKEN} characters per token of the length limit")
