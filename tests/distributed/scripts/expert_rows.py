"""Run under mpiexec: a whole tiny run with expert-sharded aggregation, recording on every rank
the expert rows of every adapter tensor it held: what the engine returned after each client,
what went into and came out of the round's collective, and the strategy's state after it.

argv: CONFIG RUN_DIR OVERRIDE...   Writes expert-rows-RANK.json beside RUN_DIR: {"range": [start, stop],
"rows": {where: sorted distinct leading sizes of expert tensors}}.
"""
import json
import sys
from pathlib import Path

from mpi4py import MPI

from pipeline.config import load_config
from pipeline.federation import assembly, commands, rounds
from pipeline.federation.expert_shards import is_expert_key

rank = MPI.COMM_WORLD.Get_rank()
cfg = load_config(sys.argv[1], sys.argv[3:])
run_dir = Path(sys.argv[2])
rows: dict[str, set] = {}
fed_box = {}


def note(where, tensors):
    rows.setdefault(where, set()).update(v.shape[0] for k, v in tensors.items() if is_expert_key(k))


real_train, real_reduce, real_build = rounds.train_client, rounds.reduce_round, assembly.build


def train_client(fed, *args, **kwargs):
    update = real_train(fed, *args, **kwargs)
    note("client update", update.adapters)
    return update


def reduce_round(*args, **kwargs):
    note("round sums in", args[3].tensors())
    out = real_reduce(*args, **kwargs)
    note("round sums out", out[0])
    return out


def build(*args, **kwargs):
    fed_box["fed"] = fed = real_build(*args, **kwargs)
    real_finalize = fed.strategy.finalize

    def finalize(sums):
        metrics = real_finalize(sums)
        note("global state", fed.strategy.global_adapters)
        return metrics
    fed.strategy.finalize = finalize
    return fed


rounds.train_client, rounds.reduce_round, assembly.build = train_client, reduce_round, build
commands.start_run(cfg, run_dir, overwrite=False)
shards = fed_box["fed"].shards
(run_dir.parent / f"expert-rows-{rank}.json").write_text(json.dumps(
    {"range": list(shards.range), "rows": {k: sorted(v) for k, v in rows.items()}}))
