"""Measured round wall time and GPU (here: rank) utilisation under `federation.placement` tier
and balanced, as ratios measured in one invocation (docs/placement.md).

Runs the tiny end-to-end config (tests/fixtures/tiny_run.yaml, shipped model) under
`mpiexec -n 4` with client groups of different sizes (tier low: 1 rank, tier high: 3 ranks),
alternating tier and balanced runs `--repeats` times so that drift of a shared machine hits both
alike, and reads every `round` event of metrics.jsonl:

- round wall: the round's seconds (sampling, every group's clients, the cross-group sum,
  finalize; evaluation and checkpoints are outside it);
- utilisation: busy rank-seconds (each group's clients' training seconds times its ranks) over
  ranks x round wall, as logged in the event's `placement`.

    python bench/placement.py [--rounds 4] [--local-steps 6] [--repeats 2] [--ranks 4] [--skip-first]
                              [--predicted-only]

First it prints `fedmoe plan`'s prediction for the shipped OLMoE-1B-7B configs at 8 and 16
ranks (seconds, no run). Means are given over all rounds and over rounds 2 and later
(round 1 is placed from the planned cost model, later ones from the learned one); `--skip-first`
leaves round 1 out of everything. Prints numbers, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"


def launcher(ranks: int) -> list[str]:
    beside = Path(sys.executable).parent / "mpiexec"
    return [str(beside) if beside.exists() else "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py"]


def run(out: Path, ranks: int, overrides: list[str]) -> list[dict]:
    cmd = [*launcher(ranks), "-m", "pipeline.cli", "run", "--config", str(TINY), "--out", str(out), "--overwrite"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "round"]


def summarise(rounds: list[dict]) -> tuple[float, float]:
    """Mean round wall (s) and the wall-weighted mean utilisation."""
    walls = [r["seconds"] for r in rounds]
    busy = sum(r["placement"]["utilisation"] * r["seconds"] for r in rounds)
    return statistics.mean(walls), busy / sum(walls)


def predicted(ranks: list[int]) -> None:
    """`fedmoe plan`'s prediction for every shipped OLMoE-1B-7B config: mean GPU utilisation
    over the run's sampled schedule under both placements, and the ratio of summed round walls."""
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.federation.topology import plan_layout
    from pipeline.plan.memory import model_shape
    from pipeline.plan.utilisation import mean_utilisation, schedule

    print("predicted (planned cost model), configs/olmoe-1b-7b/*.yaml, mean GPU utilisation over the run")
    print(f"{'config':>15}  {'ranks':>5}  {'tier':>5}  {'balanced':>8}  {'wall balanced/tier':>18}")
    for path in sorted((REPO / "configs" / "olmoe-1b-7b").glob("*.yaml")):
        cfg = load_config(path)
        shape = model_shape(cfg.model.source)
        for n in ranks:
            layout = plan_layout(cfg, n)
            tier, balanced = (schedule(cfg, layout, shape, m) for m in ("tier", "balanced"))
            walls = [sum(r.wall for r in s) for s in (tier, balanced)]
            print(f"{path.stem:>15}  {n:5d}  {mean_utilisation(tier):5.0%}  {mean_utilisation(balanced):8.0%}  "
                  f"{walls[1] / walls[0]:18.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=4, help="world size: a 1-rank low group, the rest high")
    parser.add_argument("--skip-first", action="store_true", help="leave round 1 out of the means")
    parser.add_argument("--predicted-only", action="store_true", help="only the shipped configs' prediction")
    args = parser.parse_args()
    predicted([8, 16])
    if args.predicted_only:
        return
    common = [f"federation.rounds={args.rounds}", "federation.clients=8", "federation.clients_per_round=4",
              f"train.local_steps={args.local_steps}", "tiers.0.ranks=1", f"tiers.1.ranks={args.ranks - 1}",
              "checkpoint.save_merged=false", f"eval.every={args.rounds}"]
    results: dict[str, list[dict]] = {"tier": [], "balanced": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in results:
                rounds = run(Path(tmp) / f"{mode}-{repeat}", args.ranks, common + [f"federation.placement={mode}"])
                results[mode] += rounds[1:] if args.skip_first else rounds
    print(f"# python bench/placement.py --rounds {args.rounds} --local-steps {args.local_steps} "
          f"--repeats {args.repeats} --ranks {args.ranks}{' --skip-first' if args.skip_first else ''}")
    print(f"tiny OLMoE, mpiexec -n {args.ranks}: groups of 1 (low) and {args.ranks - 1} (high) ranks, "
          f"4 of 8 clients a round, {args.local_steps} local steps of batch 8, {len(results['tier'])} rounds each")
    print(f"{'placement':>10}  {'round wall s':>12}  {'utilisation':>11}  {'rounds 2+: wall s':>17}  "
          f"{'utilisation':>11}  per-round groups (first run)")
    stats = {}
    for mode, rounds in results.items():
        later = [r for r in rounds if r["round"] > 1]
        stats[mode] = summarise(rounds), summarise(later) if later else (float("nan"), float("nan"))
        groups = " | ".join(str(r["placement"]["groups"]) for r in rounds[:args.rounds - args.skip_first])
        (wall, used), (wall2, used2) = stats[mode]
        print(f"{mode:>10}  {wall:12.2f}  {used:11.1%}  {wall2:17.2f}  {used2:11.1%}  {groups}")
    for i, label in enumerate(("all rounds", "rounds 2+ (placed by the learned model)")):
        (wt, ut), (wb, ub) = stats["tier"][i], stats["balanced"][i]
        print(f"balanced / tier, {label}: round wall {wb / wt:.2f}x, utilisation {ub / ut:.2f}x")

if __name__ == "__main__":
    main()
