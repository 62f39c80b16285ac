"""Assembling a run: the model, tokenizer, tiers, strategy and data it reads, then the engine,
topology and metrics that make a `Federation`, the state held between rounds."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.algorithms import ModelInfo, Strategy, build_strategy, check_method
from pipeline.algorithms.client_store import RunStorage
from pipeline.config import Config, Tier, resolve_tiers
from pipeline.engine.client import ClientEngine
from pipeline.engine.determinism import use_deterministic_kernels
from pipeline.eval.metrics import MetricsLogger
from pipeline.federation.client_queue import ClientQueue
from pipeline.federation.distributed import GroupMetrics
from pipeline.federation.expert_shards import ExpertShards
from pipeline.federation.placement import Placement
from pipeline.federation.inputs import FederatedData, load_federated_data, load_patched_model
from pipeline.federation.sampling import ADAPTER_INIT, assign_tiers, derive_seed
from pipeline.federation.timing import PhaseClock
from pipeline.federation.topology import Topology, current_topology
from pipeline.model import init_adapter_state
from pipeline.model.base_delta import base_weight_shapes
from pipeline.model.routing import enable_routing_modulation, set_record_routing


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
    placement: Placement | None = None  # which group trains which client, and its cost model
    clock: PhaseClock = field(default_factory=PhaseClock)  # this rank's seconds per phase (timing.py)
    queue: ClientQueue | None = None  # federation.placement=queue over several groups

    @property
    def writes(self) -> bool:  # only world rank 0 writes metrics, checkpoints and outputs
        return self.topology is None or self.topology.writes


def setup(cfg: Config, loaded=None, data=None):
    """Model, tokenizer, tiers, strategy (with its initial state) and data: all a run reads.
    `loaded` (a patched model, its tokenizer) and `data` (a FederatedData or its duck type)
    replace what cfg.model and cfg.data would load: benchmarks bring their own."""
    check_method(cfg.algorithm.name, cfg.algorithm.options)  # before the model loads
    from pipeline.federation.async_rounds import check_mode

    check_mode(cfg)  # the method fits federation.mode
    use_deterministic_kernels(cfg.train.deterministic)
    model, tokenizer = loaded or load_patched_model(cfg.model)
    torch.manual_seed(cfg.seed)  # nothing should draw from it; pinned anyway
    mcfg = model.config
    tiers = resolve_tiers(cfg, mcfg.num_experts, mcfg.num_experts_per_tok)
    info = ModelInfo(mcfg.num_hidden_layers, mcfg.num_experts, mcfg.num_experts_per_tok,
                     cfg.model.lora.rank, cfg.model.lora.alpha)
    strategy = build_strategy(cfg.algorithm.name, cfg.algorithm.options, info, tiers)
    strategy.total_rounds = cfg.federation.rounds
    apply_model_features(model, strategy, cfg)
    initial = init_adapter_state(model, derive_seed(cfg.seed, ADAPTER_INIT))
    if cfg.model.init_adapter:  # a peft adapter to start from, checked against the model
        from pipeline.federation.peft_inputs import start_adapters

        initial = start_adapters(model, strategy, cfg, initial)
    strategy.init_state(initial)
    strategy.check_run(base_weight_shapes(model), max(t.ranks for t in cfg.tiers))
    data = data if data is not None else load_federated_data(cfg, tokenizer)
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
    engine = ClientEngine(model, cfg.train, cfg.deepspeed, topology.group.dims)
    strategy.group_sums = engine.group_sums  # its gradient hooks sum over the group with these
    shards = sharded_aggregation(topology, strategy, model.config.num_experts)
    if shards is not None:  # from here on this rank holds only its experts' adapters
        strategy.shard_experts(*shards.range)
        engine.sharded_io = True
    strategy.attach_storage(run_storage(run_dir, topology, shards))
    metrics = (MetricsLogger(run_dir, resume_offset=resume_offset, tensorboard=cfg.logging.tensorboard)
               if topology.writes else None)
    if topology.distributed:
        metrics = GroupMetrics(metrics)
    client_tiers = assign_tiers(cfg.federation.clients, tiers, cfg.seed)
    placement = Placement.for_run(cfg, topology.layout, model.config.to_dict(), tiers, client_tiers)
    queue = (ClientQueue(topology, cfg.federation.collective_timeout)
             if cfg.federation.placement == "queue" and len(topology.layout.groups) > 1 else None)
    return Federation(cfg, run_dir, tiers, client_tiers, data, tokenizer, engine, strategy, metrics,
                      topology=topology, shards=shards, placement=placement, queue=queue)


def run_storage(run_dir: Path, topology: Topology, shards: ExpertShards | None) -> RunStorage:
    """RUN/client_state, written by each client group's first rank (and, for expert rows under
    expert-sharded aggregation, by the ranks whose expert sums count), pruned by world rank 0."""
    if not topology.distributed:
        return RunStorage(run_dir / "client_state")
    dense = topology.group_rank == 0
    return RunStorage(run_dir / "client_state", writes_dense=dense,
                      writes_experts=shards.contributes if shards is not None else dense,
                      prunes=topology.writes, barrier=topology.barrier)


def sharded_aggregation(topology: Topology, strategy: Strategy, num_experts: int) -> ExpertShards | None:
    """Expert-sharded aggregation when some group is expert-parallel and the method allows it."""
    if not topology.distributed or not strategy.expert_sharded:
        return None
    groups = [g.dims for g in topology.layout.groups]
    if not any(d.ep_enabled for d in groups):
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
    return topology.group_rank < fed.engine.dims.ep
