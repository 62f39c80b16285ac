"""The synchronous federated run: sample, train each client, aggregate, evaluate, checkpoint.

One process here; the same round loop runs per client group under MPI (federation/topology).
Rounds are numbered from 1; round 0 is the base model's evaluation and the first checkpoint.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from pipeline import checkpoint
from pipeline.algorithms import ClientUpdate, ModelInfo, Strategy, build_strategy
from pipeline.config import Config, Tier, dump_config, load_config, resolve_tiers
from pipeline.data.truncate import CHARS_PER_TOKEN
from pipeline.engine.client import ClientEngine, check_deepspeed_config
from pipeline.engine.determinism import use_deterministic_kernels
from pipeline.errors import RetryableError, UserError
from pipeline.eval.divergence import Guard, halt
from pipeline.eval.metrics import MetricsLogger, round_table
from pipeline.eval.report import balance_stats, write_report
from pipeline.federation import restore, rundir, signals
from pipeline.federation.collectives import PackedSums
from pipeline.federation.distributed import GroupMetrics, reduce_round
from pipeline.federation.expert_shards import ExpertShards, is_expert_key
from pipeline.federation.evaluation import evaluate_run, evaluate_tiers  # noqa: F401 - evaluate_run stays importable here
from pipeline.federation.inputs import FederatedData, load_federated_data, load_patched_model
from pipeline.federation.sampling import (ADAPTER_INIT, LOCAL_DATA, assign_tiers, derive_seed,
                                          local_batches, sample_clients)
from pipeline.federation.rundir import on_writer
from pipeline.federation.topology import Topology, current_topology
from pipeline.model import (flops_per_token, init_adapter_state, save_merged,
                            set_base_delta, set_lora_rank, set_top_k)
from pipeline.model.expert_parallel import gathered_experts
from pipeline.model.routing import enable_routing_modulation, set_record_routing

console = Console()


class RoundFailed(RetryableError):
    """Too few clients reported; the run stays resumable from its last checkpoint."""


@dataclass
class Federation:
    """Everything a run holds between rounds."""

    cfg: Config
    run_dir: Path
    tiers: list[Tier]
    client_tiers: list[Tier]
    data: FederatedData
    tokenizer: object
    engine: ClientEngine
    strategy: Strategy
    metrics: MetricsLogger
    tier_stats: dict = field(default_factory=dict)
    topology: Topology | None = None  # this rank's client group under MPI (None: one process)
    shards: ExpertShards | None = None  # this rank's experts, when the method aggregates by shard
    sums_layout: list = field(default_factory=list)  # the last round's agreed PackedSums layout

    @property
    def writes(self) -> bool:  # only world rank 0 writes metrics, checkpoints and outputs
        return self.topology is None or self.topology.writes


def setup(cfg: Config):
    """Model, tokenizer, tiers, strategy (with its initial state) and data: all a run reads."""
    build_strategy(cfg.algorithm.name, cfg.algorithm.options, None, [])  # name, options: before the model loads
    use_deterministic_kernels(cfg.train.deterministic)
    model, tokenizer = load_patched_model(cfg.model)
    torch.manual_seed(cfg.seed)  # nothing should draw from it; pinned anyway
    mcfg = model.config
    tiers = resolve_tiers(cfg, mcfg.num_experts, mcfg.num_experts_per_tok)
    info = ModelInfo(mcfg.num_hidden_layers, mcfg.num_experts, mcfg.num_experts_per_tok,
                     cfg.model.lora.rank, cfg.model.lora.alpha)
    strategy = build_strategy(cfg.algorithm.name, cfg.algorithm.options, info, tiers)
    apply_model_features(model, strategy, cfg)
    strategy.init_state(init_adapter_state(model, derive_seed(cfg.seed, ADAPTER_INIT)))
    data = load_federated_data(cfg, tokenizer)
    return model, tokenizer, tiers, strategy, data


def apply_model_features(model, strategy: Strategy, cfg: Config) -> None:
    """What the method needs of the model (DMR's phi, routing records), before the engine exists."""
    features = strategy.model_features
    if features.get("routing_modulation"):
        enable_routing_modulation(model, features["routing_modulation"])
    if features.get("record_routing"):
        set_record_routing(model, True)


def build(cfg: Config, run_dir: Path, resume_offset: int | None, parts=None) -> Federation:
    model, tokenizer, tiers, strategy, data = parts or setup(cfg)
    topology = current_topology(cfg)
    topology.init_torch(cfg.federation.master_port)  # this group's own torch.distributed world
    engine = ClientEngine(model, cfg.train, cfg.deepspeed, ep_size=tier_ep_size(cfg, topology.group.tier))
    shards = expert_shards(cfg, topology, strategy, model.config.num_experts)
    if shards is not None:  # from here on this rank holds only its experts' adapters
        strategy.shard_experts(*shards.range)
        engine.sharded_io = True
    metrics = (MetricsLogger(run_dir, resume_offset=resume_offset, tensorboard=cfg.logging.tensorboard)
               if topology.writes else None)
    if topology.distributed:
        metrics = GroupMetrics(metrics)
    return Federation(cfg, run_dir, tiers, assign_tiers(cfg.federation.clients, tiers, cfg.seed),
                      data, tokenizer, engine, strategy, metrics, topology=topology, shards=shards)


def tier_ep_size(cfg: Config, tier: str | None) -> int:
    """A tier's expert-parallel size (1 for the single-process group, whose tier is None)."""
    return next((t.ep_size for t in cfg.tiers if t.name == tier), 1)


def expert_shards(cfg: Config, topology: Topology, strategy: Strategy, num_experts: int) -> ExpertShards | None:
    """Expert-sharded aggregation when some group is expert-parallel and the method allows it."""
    if not topology.distributed or not strategy.expert_sharded:
        return None
    groups = [(g.size, tier_ep_size(cfg, g.tier)) for g in topology.layout.groups]
    if max(p for _, p in groups) == 1:
        return None
    return ExpertShards(topology.world, topology.rank, groups, num_experts)


def evaluates(fed: Federation) -> bool:
    """Evaluation and export run on world rank 0, and with it the ranks of group 0 whose
    collectives its forward passes need: under expert parallelism its expert-parallel group,
    under ZeRO-3 the whole group (every forward and write gathers the partitioned weights)."""
    topology = fed.topology
    if topology is None or topology.group.index != 0:
        return fed.writes
    if fed.engine.zero_stage == 3:
        return True
    return topology.group_rank < fed.engine.ep_size


# ---------------------------------------------------------------------------------------------
# One round


def train_client(fed: Federation, client: int, round_: int, progress: Progress | None) -> ClientUpdate:
    cfg, strategy = fed.cfg, fed.strategy
    seed = derive_seed(cfg.seed, LOCAL_DATA, round_, client)
    plan = strategy.plan(client, round_, fed.client_tiers[client], seed)
    indices = fed.data.client_indices[client]
    batches = (fed.data.train_batch(b) for b in
               local_batches(indices, cfg.train.local_steps, cfg.train.batch_size, seed))
    strategy.configure_model(fed.engine.model, plan)
    task = None
    if progress is not None:
        task = progress.add_task(f"  client {client} ({plan.tier.name}, k={plan.top_k})",
                                 total=cfg.train.local_steps)
    result = fed.engine.train(
        plan.adapters, plan.top_k, plan.lora_rank, batches,
        extra_loss=lambda m: strategy.extra_loss(m, plan),
        after_backward=lambda m: strategy.after_backward(m, plan),
        on_step=(lambda s, loss: progress.update(task, completed=s)) if task is not None else None)
    if task is not None:
        progress.remove_task(task)
    counts = result.expert_token_counts
    tokens = int(round(counts[0].sum().item() / max(plan.top_k, 1)))
    return ClientUpdate(client, round_, plan.tier, plan.top_k, plan.lora_rank, result.adapters,
                        n_samples=len(indices), expert_token_counts=counts, tokens=tokens,
                        metrics={"train_loss": sum(result.losses) / len(result.losses),
                                 "final_loss": result.losses[-1], "seconds": result.seconds,
                                 "steps": len(result.losses)},
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


def run_round(fed: Federation, round_: int, progress: Progress | None) -> dict:
    cfg, strategy = fed.cfg, fed.strategy
    start = time.perf_counter()
    clients = sample_clients(cfg.federation.clients, cfg.federation.clients_per_round, cfg.seed, round_)
    set_base_delta(fed.engine.model, strategy.base_delta())
    sums = PackedSums(fed.sums_layout, packed=(lambda k: not is_expert_key(k)) if fed.shards else None)
    load: dict[str, torch.Tensor] = {}
    accepted, updates = [], []
    plan_shapes = strategy.global_adapters  # updates must match the global adapters' keys and shapes
    mine = clients if fed.topology is None else fed.topology.my_clients(
        clients, [t.name for t in fed.client_tiers])  # under MPI: this group's share
    offset = fed.metrics.offset()  # the record of the completed rounds, should this one be abandoned
    for client in mine:
        if signals.requested():  # SIGUSR1/SIGTERM: the clients not started yet wait for the resumed run
            break
        try:
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
    if signals.agree(fed.topology, cfg.federation.collective_timeout):  # any rank stopped: drop the round
        raise signals.Preempted(round_ - 1, offset)
    packed = sums  # every group's sums, loads and updates, identical on all ranks
    sums, load, accepted, updates = reduce_round(fed.topology, cfg.federation.collective_timeout,
                                                 fed.metrics, packed, load, accepted, updates, fed.shards)
    fed.sums_layout = packed.spec
    if len(accepted) < cfg.federation.min_clients:
        raise RoundFailed(f"round {round_}: {len(accepted)} of {len(clients)} clients reported, "
                          f"federation.min_clients={cfg.federation.min_clients}")
    strategy.finalize(sums)
    fed.tier_stats = tier_training_stats(fed, updates, load)
    fed.metrics.log("round", round=round_, seconds=time.perf_counter() - start, clients=accepted,
                    expert_load={t: v.tolist() for t, v in load.items()}, tiers=fed.tier_stats)
    return load


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


def evaluate(fed: Federation, round_: int) -> list[dict]:
    if not evaluates(fed):  # other ranks hold the same state; rank 0 evaluates it
        return []
    rows = evaluate_tiers(fed.engine.model, fed.strategy, fed.tiers, fed.data, fed.cfg.eval, round_,
                          fed.engine.load_adapters)
    if not fed.writes:
        return []
    for row in rows:
        row.update(fed.tier_stats.get(row["tier"], {}))  # the latest round's training cost and balance
        fed.metrics.log("eval", **row)
    return rows


# ---------------------------------------------------------------------------------------------
# The run


def save_round(fed: Federation, round_: int, offset: int | None = None) -> None:
    """Every rank calls it: with expert shards their writers save their rows first."""
    if fed.shards is None and not fed.writes:
        return
    tensors = fed.strategy.state_dict()
    state, tensors = tensors["meta"], tensors["tensors"]
    if fed.shards is not None:
        tensors = stage_expert_rows(fed, checkpoint.staging_dir(fed.run_dir, round_), tensors)
    if not fed.writes:
        return
    offset = fed.metrics.offset() if offset is None else offset
    checkpoint.save_checkpoint(fed.run_dir, round_, tensors,
                               {"strategy": state, "metrics_offset": offset,
                                "algorithm": fed.cfg.algorithm.name},
                               keep=fed.cfg.checkpoint.keep, staged=fed.shards is not None)


def stage_expert_rows(fed: Federation, directory: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The shard writers save their experts' rows of `tensors` into `directory` (emptied
    first); returns the other tensors, for world rank 0. A collective: every rank calls it."""
    if fed.writes:
        checkpoint.clear_dir(directory)
    fed.topology.barrier()
    if fed.shards.writes:
        checkpoint.save_expert_shard(directory, {k: v for k, v in tensors.items() if is_expert_key(k)},
                                     *fed.shards.range)
    fed.topology.barrier()
    return {k: v for k, v in tensors.items() if not is_expert_key(k)}


def write_final(fed: Federation) -> Path:
    """final/adapter.safetensors (+ base_delta.safetensors for merging methods), final/model/.
    Every rank calls it; with expert shards the adapter file is joined from the writers' rows."""
    final, tmp = fed.run_dir / "final", fed.run_dir / ".final.tmp"
    held = adapters = fed.strategy.eval_adapters(None)  # under expert shards: this rank's rows
    if fed.shards is not None:  # the writers save the expert rows; `adapters` keeps the rest
        adapters = stage_expert_rows(fed, tmp, held)
    elif fed.writes:
        checkpoint.clear_dir(tmp)
    if fed.writes:
        shards = checkpoint.expert_shards(tmp)
        if shards:
            checkpoint.join_expert_shards(tmp / "adapter.safetensors", adapters, shards)
            for _, _, path in shards:
                path.unlink()
        else:
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
        delta = fed.strategy.base_delta()
        if delta:
            save_file({k: v.contiguous() for k, v in delta.items()}, str(tmp / "base_delta.safetensors"))
    if fed.cfg.checkpoint.save_merged and evaluates(fed):
        export_merged(fed, held, tmp / "model")
    if fed.writes:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def export_merged(fed: Federation, adapters: dict[str, Tensor], out: Path) -> None:
    """The merged model at full top-k and rank, written by world rank 0. Under expert
    parallelism its expert-parallel group all-gathers the experts first (gathered_experts):
    the one place where a rank holds every expert, because the export is the whole model."""
    model = fed.engine.model
    fed.engine.load_adapters(adapters)
    set_base_delta(model, fed.strategy.base_delta())
    fed.strategy.configure_model(model, None)  # its LoRA scale, as at evaluation
    set_top_k(model, model.config.num_experts_per_tok)
    set_lora_rank(model, fed.cfg.model.lora.rank)
    with gathered_experts(model):  # ZeRO-3: the other ranks take part in save_merged's gathers
        save_merged(model, out if fed.writes else None, tokenizer=fed.tokenizer)


def _progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def execute(cfg: Config, run_dir: Path, start_round: int, resume_offset: int | None,
            state: Path | None, parts=None, started=None) -> Path | None:
    """Run rounds start_round..rounds; `state` is the checkpoint to resume (None: a fresh run),
    of which a rank with expert shards reads only its experts' rows. `started()` is called
    once a fresh run's round 0 is saved."""
    fed = build(cfg, run_dir, resume_offset, parts)
    if state is not None:
        tensors, meta = checkpoint.load_checkpoint(state, fed.shards.range if fed.shards else None)
        fed.strategy.load_state_dict({"tensors": tensors, "meta": meta["strategy"]})
    # The bits are reproducible for a given thread count and library versions: record both.
    fed.metrics.log("run", status="resumed" if state else "started", round=start_round,
                    threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled(),
                    torch=torch.__version__)
    log_data(fed)
    guard = Guard.for_run(cfg.train, run_dir if state is not None and fed.writes else None)
    show = cfg.logging.progress and fed.writes
    progress = _progress(show)
    previous: dict[str, float] = {}
    if state is None:
        rows = evaluate(fed, 0)
        _print_table(rows, previous, fed.data.chance, 0, show)
        guard.after_eval(fed, rows, console)  # the base model's evaluation: the reference
        save_round(fed, 0)
        if started is not None and fed.writes:
            started()
        start_round = 1
    rounds = cfg.federation.rounds
    with progress or _nullcontext():
        task = progress.add_task("rounds", total=rounds, completed=start_round - 1) if progress else None
        for round_ in range(start_round, rounds + 1):
            try:
                run_round(fed, round_, progress)
            except signals.Preempted as stop:  # SIGUSR1/SIGTERM: keep the completed rounds, return (exit 0)
                signals.pause(fed, stop, save_round)
                return None
            diverged = None
            if round_ % cfg.eval.every == 0 or round_ == rounds:
                rows = evaluate(fed, round_)
                _print_table(rows, previous, fed.data.chance, round_, show)
                diverged = guard.after_eval(fed, rows, console)
            if round_ % cfg.checkpoint.every == 0 or round_ == rounds or diverged:
                save_round(fed, round_)
            if diverged:  # train.on_divergence: stop; resumable from this round's checkpoint
                halt(fed, round_, diverged)
            if progress:
                progress.update(task, completed=round_)
    final = write_final(fed)
    fed.metrics.log("run", status="finished", round=rounds)
    fed.metrics.close()
    if torch.distributed.is_initialized():  # NCCL warns about leaked resources otherwise
        torch.distributed.destroy_process_group()
    if fed.writes:
        report = write_report(run_dir)
        console.print(f"[bold]done[/]: adapters in {final}/adapter.safetensors, report in {report}")
    return final


def log_data(fed: Federation) -> None:
    """How much data the run has, and how many records were cut before tokenization."""
    data = fed.data
    fed.metrics.log("data", train=len(data.train_examples), eval=len(data.eval_examples),
                    truncated=data.truncated)
    if data.truncated and fed.writes:
        console.print(f"[bold yellow]warning[/]: {data.truncated} data record(s) cut before tokenization "
                      f"to their last {CHARS_PER_TOKEN} characters per token of the length limit")


def _print_table(rows: list[dict], previous: dict[str, float], chance: float, round_: int,
                 enabled: bool) -> None:
    if enabled:
        table = round_table(rows, previous or None, chance)
        table.title = f"round {round_}" if round_ else "base model (round 0)"
        console.print(table)
    previous.update({r["tier"]: r["accuracy"] for r in rows})


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Entry points used by the CLI


def start_run(cfg: Config, out: Path, overwrite: bool) -> Path:
    signals.install()
    topology = current_topology(cfg)  # ranks that cannot hold the tiers' groups: an error here
    start = rundir.Start(Path(out), overwrite)
    try:
        on_writer(topology, start.check)  # a second writer is refused before anything loads
        parts = setup(cfg)  # every input is loaded and checked before anything is written
        check_deepspeed_config(cfg.train, cfg.deepspeed, topology.group.size)
        topology.barrier()  # under MPI every rank has checked its inputs before rank 0 claims `out`
        on_writer(topology, start.claim)
        if topology.writes:
            dump_config(cfg, start.out / "config.yaml")
        return execute(cfg, start.out, start_round=0, resume_offset=None, state=None, parts=parts,
                       started=start.started)
    except BaseException:
        if topology.writes:
            start.failed()  # not started: `out` as it was found, a replaced run moved back
        raise
    finally:
        start.release()


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").exists()


def _run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a fedmoe run (no config.yaml and metrics.jsonl)")
    return load_config(run_dir / "config.yaml")


def resume_run(run_dir: Path) -> Path:
    signals.install()
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    lock = on_writer(current_topology(cfg), lambda: rundir.RunLock(run_dir))
    try:
        return _resume(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _resume(cfg: Config, run_dir: Path) -> Path:
    latest = restore.choose(run_dir, current_topology(cfg).writes,
                            f"start the run again with `fedmoe run --config {run_dir}/config.yaml "
                            f"--out {run_dir} --overwrite`")
    if latest is None:  # killed before the base checkpoint: start over in place
        return execute(cfg, run_dir, start_round=0, resume_offset=0, state=None)
    done = checkpoint.load_meta(latest)["round"]
    if done >= cfg.federation.rounds and (run_dir / "final" / "adapter.safetensors").is_file():
        console.print(f"{run_dir}: already finished ({done} rounds)")
        return run_dir / "final"
    parts = setup(cfg)
    meta = restore.check_fits(latest, cfg, parts[3], run_dir / "config.yaml")  # permanent: exit 2
    return execute(cfg, run_dir, start_round=done + 1, resume_offset=meta["metrics_offset"], state=latest,
                   parts=parts)
