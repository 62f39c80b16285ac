"""fedmoe against Flower's simulation engine and a plain PyTorch loop, on one federated workload.

The workload (bench/peer_workload.py): a tiny OLMoE with random weights (hidden 128, 4 layers,
16 experts, top-4, vocabulary 512), LoRA r8 on attention and experts, 8 clients x 10 AdamW
steps of batch 8 x 128 random tokens, 3 rounds, FedAvg, the same seeded client batches and
start adapters everywhere. Implementations, each a fresh process (tree) started from here:

    plain        peft on Hugging Face's model, clients one after another, 2 threads (the baseline)
    plain-1t     the same at 1 thread: how far float summation order alone moves the adapters
    fedmoe       fedmoe's round loop, one process, 2 threads
    fedmoe-mpi   fedmoe, 2 client groups of 1 rank, 1 thread each (mpiexec -n 2)
    fedmoe-queue the same with federation.placement=queue: the groups pull clients as they free up
    flower-1x2   Flower simulation (Ray), 1 actor of 2 threads, the plain loop's client code
    flower-2x1   Flower simulation, 2 actors of 1 thread

Prints per-round and whole-run times (start-up included) as ratios to the plain loop of the
same run, the peak RSS of the largest process and of the process tree (RSS summed over its
processes, sampled every 0.1 s; shared pages count once per process), and the largest
difference of each final adapter set from the plain loop's. Asserts nothing.

    pip install -e ".[bench]"         # Flower with its Ray simulation engine
    python bench/peer_flower.py [--repeats 1] [--only plain fedmoe ...]

On a machine shared with other jobs, pass --repeats 2 or more: the variants then run in turns
and each one's median is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = {  # name: (launch ranks, runner arguments)
    "plain": (1, ["plain", "--threads", "2"]),
    "plain-1t": (1, ["plain", "--threads", "1"]),  # its adapters vs plain's: the noise floor
    "fedmoe": (1, ["fedmoe", "--threads", "2"]),
    "fedmoe-mpi": (2, ["fedmoe", "--threads", "1"]),
    "fedmoe-queue": (2, ["fedmoe", "--threads", "1", "--placement", "queue"]),  # groups pull clients
    "flower-1x2": (1, ["flower", "--threads", "2", "--actors", "1"]),
    "flower-2x1": (1, ["flower", "--threads", "1", "--actors", "2"]),
}


class TreeMemory(threading.Thread):
    """Peak RSS of the largest process and of the sum over a process tree, by sampling."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.root, self.every, self.stop = psutil.Process(pid), every, threading.Event()
        self.largest = self.tree = 0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.largest = max(self.largest, rss)
            self.tree = max(self.tree, total)
            self.stop.wait(self.every)


def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpiexec not found (the mpich package installs it into the venv)")
    return found


def run_variant(name: str, work: Path) -> dict:
    ranks, args = VARIANTS[name]
    out = work / f"{name}.safetensors"
    cmd = [sys.executable, str(HERE / "peer_runs.py"), *args, "--out", str(out),
           "--run-dir", str(work / f"run-{name}")]
    threads = args[args.index("--threads") + 1]
    env = dict(os.environ)
    if ranks > 1:
        launcher = mpiexec()
        cmd = [launcher, "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
        # The mpich wheel's libmpi sits in the venv's lib/, beside its bin/mpiexec; a venv that
        # reaches those packages from outside (a .pth) would not find it otherwise.
        lib = Path(launcher).resolve().parent.parent / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=threads, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               RAY_DEDUP_LOGS="0")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    mem.start()
    stdout, stderr = proc.communicate()
    whole = time.perf_counter() - start
    mem.stop.set()
    mem.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return dict(result, whole=whole, largest=mem.largest, tree=mem.tree, adapters=out)


def max_difference(a_path: Path, b_path: Path) -> tuple[float, float]:
    """Largest |a - b| over every adapter entry, and the same over the largest |b|."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    if set(a) != set(b):
        raise SystemExit(f"adapter names differ: {sorted(set(a) ^ set(b))[:3]}")
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    scale = max(b[k].abs().max().item() for k in b)
    return diff, diff / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--clients", type=int, default=8, help="a smaller workload for a busy machine")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    os.environ.update(PEER_CLIENTS=str(args.clients), PEER_STEPS=str(args.steps), PEER_ROUNDS=str(args.rounds))
    names = ["plain"] + [n for n in args.only if n != "plain"]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{os.cpu_count()} CPUs; repeats {args.repeats}; {args.clients} clients x {args.steps} steps "
          f"x {args.rounds} rounds", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="peer-flower-") as tmp:
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]  # alternate, so drift hits all alike
            for name in order:
                work = Path(tmp) / f"rep{rep}"
                work.mkdir(exist_ok=True)
                r = run_variant(name, work)
                runs[name].append(r)
                print(f"  {name:<11} rounds {' '.join(f'{t:.1f}' for t in r['rounds'])} s, whole {r['whole']:.1f} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        rows = {}
        for name, rs in runs.items():
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            rows[name] = dict(round=med(lambda r: statistics.mean(r["rounds"])),
                              steady=med(lambda r: statistics.mean(r["rounds"][1:] or r["rounds"])),
                              setup=med(lambda r: r["setup"]), whole=med(lambda r: r["whole"]),
                              largest=max(r["largest"] for r in rs) / 2**20, tree=max(r["tree"] for r in rs) / 2**20,
                              diff=max_difference(rs[-1]["adapters"], runs["plain"][-1]["adapters"]))
    base = rows["plain"]
    print(f"\n{'':<13} {'round s':>8} {'x plain':>8} {'steady s':>9} {'x plain':>8} {'whole s':>8} {'x plain':>8} "
          f"{'to round 1':>10} {'proc MiB':>9} {'x plain':>8} {'tree MiB':>9}  max |adapter - plain| (relative)")
    for name, r in rows.items():
        print(f"{name:<13} {r['round']:>8.1f} {r['round'] / base['round']:>8.2f} {r['steady']:>9.1f} "
              f"{r['steady'] / base['steady']:>8.2f} {r['whole']:>8.1f} {r['whole'] / base['whole']:>8.2f} "
              f"{r['setup']:>10.1f} {r['largest']:>9.0f} {r['largest'] / base['largest']:>8.2f} {r['tree']:>9.0f}"
              f"  {r['diff'][0]:.2e} ({r['diff'][1]:.1e})")
    ours = [n for n in rows if n.startswith("fedmoe")]
    peers = [n for n in rows if n.startswith("flower")]
    if ours and peers:
        best = lambda key, ns: min(rows[n][key] for n in ns)  # noqa: E731
        print(f"\ngoals: fedmoe's best round / Flower's best = {best('round', ours) / best('round', peers):.2f} "
              f"(<= 0.9; steady rounds {best('steady', ours) / best('steady', peers):.2f}); whole run = {best('whole', ours) / best('whole', peers):.2f} (<= 0.8); "
              f"largest process / plain's = {max(rows[n]['largest'] for n in ours) / base['largest']:.2f} (<= 1.2)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
