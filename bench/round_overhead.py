"""A round's wall time against its clients' local training, and peak memory against client count.

Runs the tiny end-to-end config (tests/fixtures/tiny_run.yaml, shipped model) once per number
of virtual clients, each in a fresh process, with the same clients per round, and prints:

- overhead: per round, (round wall time - sum of its clients' local training time) / that sum,
  from `metrics.jsonl` (the round's time covers sampling, engine reset per client, update
  checks, aggregation; evaluation and checkpoints are outside it). Goal: under 10%.
- peak RSS of the run's process (ru_maxrss): must not grow with the number of virtual clients,
  since a client is a seed and a data shard, not a model or optimizer.

    python bench/round_overhead.py [--clients 10 100] [--rounds 3] [--local-steps 10] [--ranks 4]

Prints numbers, asserts nothing. With `--ranks N` each run is `mpiexec -n N` (N client groups
of one rank serving the virtual clients) and the peak RSS is the largest rank's; the overhead
column is then left out, since groups train in parallel (the cross-group sum is timed by
bench/aggregate.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"


def child(out: str, overrides: list[str]) -> None:
    """Run one `fedmoe run` in this process and print its peak RSS (KiB on Linux) last."""
    from pipeline.cli import main

    args = ["run", "--config", str(TINY), "--out", out, "--overwrite"]
    for item in overrides:
        args += ["--set", item]
    code = main(args)
    print(json.dumps({"exit": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)


def launch(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    beside = Path(sys.executable).parent / "mpiexec"
    return [str(beside) if beside.exists() else "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py"]


def overheads(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train: dict[int, float] = {}
    for e in events:
        if e["event"] == "client":
            train[e["round"]] = train.get(e["round"], 0.0) + e["seconds"]
    return [(e["seconds"] - train[e["round"]]) / train[e["round"]] for e in events
            if e["event"] == "round" and train.get(e["round"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks (client groups of one rank)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    print(f"tiny config, {args.rounds} rounds, 4 clients a round, {args.local_steps} local steps, "
          f"{args.ranks} rank(s)")
    print(f"{'clients':>8} {'peak RSS MiB':>13} {'round overhead (median, max)' if args.ranks == 1 else '':>30}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            run = Path(tmp) / f"clients-{n}"
            sets = [f"federation.clients={n}", "federation.clients_per_round=4",
                    f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
                    "data.n_train_per_family=100", "checkpoint.save_merged=false", "logging.progress=false"]
            proc = subprocess.run([*launch(args.ranks), __file__, "--child", str(run), *sets], cwd=REPO,
                                  env=env, capture_output=True, text=True)
            results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"exit"')]
            if proc.returncode != 0 or len(results) != args.ranks or any(r["exit"] != 0 for r in results):
                sys.exit(f"run with {n} clients failed:\n{proc.stderr[-2000:]}")
            rss = max(r["maxrss_kib"] for r in results) / 1024
            ov = overheads(run)
            spread = f"{statistics.median(ov) * 100:>20.1f}%, {max(ov) * 100:.1f}%" if args.ranks == 1 else ""
            print(f"{n:>8} {rss:>13.0f} {spread}", flush=True)


if __name__ == "__main__":
    main()
