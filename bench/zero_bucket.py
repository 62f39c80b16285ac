"""ZeRO's gradient bucket sized to the adapters against DeepSpeed's default, in one run.

Runs the tiny config as 2 client groups of 2 ranks under ZeRO 2 (`mpiexec -n 4`), alternating:
`default` passes a DeepSpeed JSON with `reduce_bucket_size` and `allgather_bucket_size` at
DeepSpeed's own default (5e8 elements), `adapters` leaves them to fedmoe (every adapter
element, which is what the client engine sets). Prints each run's wall, user and system CPU
seconds, the median ratio adapters / default, and whether the final adapters are the same bits.

    python bench/zero_bucket.py [--repeats 2] [--stage 2] [--ranks 4]

Prints numbers, asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"
DEEPSPEED_DEFAULT = 500_000_000  # ZeRO's reduce/allgather bucket default, in elements


def run(out: Path, ranks: int, stage: int, ds_json: Path | None) -> dict:
    beside = Path(sys.executable).parent / "mpiexec"
    cmd = [str(beside) if beside.exists() else "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py",
           "-m", "pipeline.cli", "run", "--config", str(TINY), "--out", str(out), "--overwrite",
           "--set", f"tiers.0.ranks={ranks // 2}", "--set", f"tiers.1.ranks={ranks // 2}",
           "--set", f"deepspeed.zero_stage={stage}"]
    if ds_json:
        cmd += ["--set", f"deepspeed.config={ds_json}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    digest = hashlib.sha256((out / "final" / "adapter.safetensors").read_bytes()).hexdigest()
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "sha": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--ranks", type=int, default=4, help="even: 2 client groups of ranks/2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds_json = Path(tmp) / "default-buckets.json"
        ds_json.write_text(json.dumps({"zero_optimization": {
            "stage": args.stage, "reduce_bucket_size": DEEPSPEED_DEFAULT, "allgather_bucket_size": DEEPSPEED_DEFAULT}}))
        results: dict[str, list[dict]] = {"default": [], "adapters": []}
        for i in range(args.repeats):
            for name in results:
                r = run(Path(tmp) / f"{name}-{i}", args.ranks, args.stage, ds_json if name == "default" else None)
                results[name].append(r)
                print(f"{name:9s} run {i}: wall {r['wall']:6.1f} s  user {r['user']:6.1f} s  sys {r['sys']:6.1f} s",
                      flush=True)
    wall = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    shas = {r["sha"] for v in results.values() for r in v}
    print(f"ZeRO {args.stage}, {args.ranks} ranks: wall adapters / default = {wall['adapters'] / wall['default']:.2f}"
          f" (medians {wall['adapters']:.1f} / {wall['default']:.1f} s); final adapters "
          f"{'the same bits in every run' if len(shas) == 1 else 'DIFFER'}")


if __name__ == "__main__":
    main()
