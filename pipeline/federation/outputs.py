"""What a run writes besides metrics.jsonl: round checkpoints, and final/ (the adapters, a
merging method's base delta, the merged model). Every rank calls these: with expert shards
the shard writers save their experts' rows, and the export's gathers are collectives."""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from pipeline import checkpoint
from pipeline.federation.assembly import Federation, evaluates
from pipeline.federation.expert_shards import is_expert_key
from pipeline.federation.export_run import export_setting, place_model
from pipeline.model import save_merged


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
    staging = checkpoint.staging_dir(fed.run_dir, round_)
    if fed.shards is None:
        checkpoint.clear_dir(staging)
    fed.strategy.stage_files(staging)  # the method's own files (per-client state)
    checkpoint.save_checkpoint(fed.run_dir, round_, tensors,
                               {"strategy": state, "metrics_offset": offset,
                                "algorithm": fed.cfg.algorithm.name,
                                **({"placement": fed.placement.state_dict()} if fed.placement else {})},
                               keep=fed.cfg.checkpoint.keep, staged=True)


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
    delta = fed.strategy.base_delta()  # a merging method's; under expert shards this rank's rows
    if fed.shards is not None:  # the writers save the expert rows; `adapters` keeps the rest
        adapters = stage_expert_rows(fed, tmp, held)
        if delta:
            delta = stage_expert_rows(fed, tmp / "delta", delta)
    elif fed.writes:
        checkpoint.clear_dir(tmp)
    if fed.writes:
        _save_joined(tmp / "adapter.safetensors", adapters, tmp)
        if delta:
            _save_joined(tmp / "base_delta.safetensors", delta, tmp / "delta")
            shutil.rmtree(tmp / "delta", ignore_errors=True)
    if fed.cfg.checkpoint.save_merged and evaluates(fed):
        export_merged(fed, held, tmp / "model")
    if fed.writes:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def _save_joined(path: Path, tensors: dict[str, Tensor], staged: Path) -> None:
    """`tensors` plus the expert rows staged in `staged` (if any) as one file at `path`."""
    shards = checkpoint.expert_shard_files(staged) if staged.is_dir() else []
    if shards:
        checkpoint.join_expert_shard_files(path, tensors, shards)
        for _, _, shard in shards:
            shard.unlink()
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def export_merged(fed: Federation, adapters: dict[str, Tensor], out: Path) -> None:
    """The merged model at full top-k and rank, written by world rank 0, as `fedmoe export
    --format merged` writes it (export_run). Under expert parallelism its expert-parallel group
    all-gathers the experts first (engine.whole_experts): the one place where a rank holds every
    expert, because the export is the whole model."""
    model = fed.engine.model
    _, setting = export_setting(fed.strategy, None, model.config.num_experts_per_tok, fed.cfg.model.lora.rank)
    place_model(model, fed.strategy, adapters, setting, fed.engine.load_adapters, fed.engine.use)
    with fed.engine.whole_experts():  # ZeRO-3: the other ranks take part in save_merged's gathers
        save_merged(model, out if fed.writes else None, tokenizer=fed.tokenizer)
