"""The entry points of `fedmoe run` and `fedmoe resume`: claim or lock the run directory,
check every input, then hand over to the round loop (rounds.execute)."""
from __future__ import annotations

from pathlib import Path

from pipeline import checkpoint
from pipeline.config import Config, dump_config
from pipeline.engine.client import check_deepspeed_config
from pipeline.federation import restore, rundir, signals
from pipeline.federation.assembly import setup
from pipeline.federation.callbacks import console
from pipeline.federation.rounds import execute as execute_sync
from pipeline.federation.rundir import on_writer
from pipeline.federation.topology import current_topology


def execute(cfg: Config, *args, **kwargs):
    """The round loop of the run's federation.mode."""
    if cfg.federation.mode == "async":
        from pipeline.federation.async_rounds import execute as execute_async

        return execute_async(cfg, *args, **kwargs)
    return execute_sync(cfg, *args, **kwargs)


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


def resume_run(run_dir: Path) -> Path:
    signals.install()
    run_dir = Path(run_dir)
    cfg = rundir.run_config(run_dir)
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
