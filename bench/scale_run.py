"""A whole federated run at OLMoE-1B-7B shapes: predicted against measured memory, and where
the wall time goes.

Random weights (no hub is reachable from the machines this was written for), written once as a
bf16 Hugging Face directory with the shipped tokenizer; synthetic multiple-choice records long
enough that every sequence is `--seq` tokens, so the run trains exactly the tokens `fedmoe
plan`'s estimate assumes. The run: 2 rounds of 2 clients of different tiers (top-8 and top-2),
a few local steps each, a checkpoint every round; it is killed (SIGKILL) once round 1's
checkpoint is down and resumed with `fedmoe resume`, which trains round 2, evaluates and
writes the merged model; then `fedmoe export --format merged` once more, timed on its own.

Prints per tier the per-rank peak memory `fedmoe plan` predicts beside the one measured (each
client's `peak_memory_gib`: CUDA allocated bytes during its training), whether the plan and the
run used activation checkpointing (`--top-gpu-gb` below the top tier's need makes `auto`
checkpoint that tier, so one run checks both estimates), and the wall time split
into load, local training, aggregation, evaluation, checkpoint and export (the run's `timing`
events, world rank 0). Asserts nothing.

    python bench/scale_run.py                                 # OLMoE-1B-7B shapes, needs a GPU (bf16)
    python bench/scale_run.py --model small --out /tmp/sr     # a small shape on CPU: checks the script
    python bench/scale_run.py --ranks 2                       # 2 client groups under mpiexec
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "assets" / "tiny-olmoe"
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=8,
             max_position_embeddings=2048, norm_topk_prob=False, pad_token_id=0, eos_token_id=None,
             tie_word_embeddings=False)


def write_model(shape: dict, layers: int | None, out: Path, cuda: bool) -> None:
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(**dict(shape, **({"num_hidden_layers": layers} if layers else {})))
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = OlmoeForCausalLM(config).to(torch.bfloat16)
        with torch.no_grad():
            for layer in model.model.layers:  # transformers may start the router at zero
                layer.mlp.gate.weight.normal_(0, 0.02)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / name)


def write_records(path: Path, n: int, words: int, seed: int) -> None:
    """LLM-Adapters-style PIQA records whose question alone outlasts the sequence length."""
    rng = random.Random(seed)
    vocab = ["red", "blue", "cup", "box", "tree", "stone", "river", "lamp", "door", "bird"]
    records = []
    for _ in range(n):
        question = " ".join(rng.choice(vocab) for _ in range(words))
        answer = rng.choice(["solution1", "solution2"])
        records.append({"instruction": f"Please choose the correct solution to the question: {question}\n\n"
                                       "Solution1: go left\n\nSolution2: go right\n\n"
                                       "Answer format: solution1/solution2",
                        "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    path.write_text(json.dumps(records))


def write_config(args, out: Path, cuda: bool) -> Path:
    import yaml

    cfg = {
        "seed": 0,
        "model": {"source": str(out / "model"), "dtype": "bfloat16" if cuda else "float32",
                  "lora": {"rank": 8, "alpha": 16, "experts": True, "attention": True}},
        "tiers": [{"name": "t8", "budget": 1.0, "share": 1.0, "ranks": 1,
                   "gpu_memory_gb": args.top_gpu_gb or args.gpu_gb},
                  {"name": "t2", "budget": 0.25, "share": 1.0, "ranks": 1, "gpu_memory_gb": args.gpu_gb}],
        "federation": {"clients": 2, "clients_per_round": 2, "rounds": 2, "min_clients": 1},
        "algorithm": {"name": "smoe", "options": {}},
        "train": {"local_steps": args.steps, "batch_size": args.batch, "max_length": args.seq,
                  "lr": 1e-4, "precision": "bf16" if cuda else "fp32"},
        "data": {"source": "commonsense", "path": str(out / "train.json"), "eval_path": str(out / "eval.json")},
        "eval": {"batch_size": args.batch},
        "checkpoint": {"every": 1, "keep": 2, "save_merged": True},
        "logging": {"tensorboard": False, "progress": False},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def command(args, *cli: str) -> list[str]:
    base = [sys.executable, "-m", "pipeline.cli", *cli]
    if args.ranks > 1:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        return [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", *base[1:]]
    return base


def run_killed_then_resumed(args, config: Path, run: Path, env: dict) -> dict[str, float]:
    """Wall seconds of: the run up to its kill after round 1's checkpoint, the resume."""
    latest = run / "checkpoints" / "latest"
    start = time.perf_counter()
    proc = subprocess.Popen(command(args, "run", "--config", str(config), "--out", str(run)),
                            env=env, cwd=REPO, start_new_session=True)
    while proc.poll() is None and not (latest.is_file() and latest.read_text().strip() == "round-000001"):
        time.sleep(0.2)
    if proc.poll() is not None:
        raise SystemExit(f"the run ended (exit {proc.returncode}) before round 1's checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # what a node failure does: no chance to save anything
    proc.wait()
    killed = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(command(args, "resume", str(run)), env=env, cwd=REPO, check=True)
    return {"run until killed": killed, "resume to the end": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["olmoe-1b-7b", "small"], default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="local steps per client")
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks: 2 puts each tier's client on its own group")
    ap.add_argument("--gpu-gb", type=float, default=141.0, help="the GPU's memory, for the plan's fit check")
    ap.add_argument("--top-gpu-gb", type=float, default=None,
                    help="the top-8 tier's GPU memory instead: below its plan without checkpointing, "
                         "train.activation_checkpointing=auto checkpoints that tier only")
    ap.add_argument("--out", default=None, help="a new directory (default: a temporary one, removed after)")
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if args.model == "olmoe-1b-7b" and not cuda:
        raise SystemExit("olmoe-1b-7b needs a CUDA GPU; --model small checks the script on CPU")
    if args.out and Path(args.out).exists():
        raise SystemExit(f"--out {args.out}: exists; choose a new directory")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scale-run-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if cuda else "cpu"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        from pipeline.model.build import OLMOE_1B_7B

        shape = OLMOE_1B_7B if args.model == "olmoe-1b-7b" else SMALL
        t = time.perf_counter()
        write_model(shape, args.layers, out / "model", cuda)
        words = 2 * args.seq  # the tokenizer gives at least one token a word
        write_records(out / "train.json", 4 * args.batch, words, seed=0)
        write_records(out / "eval.json", args.batch, words, seed=1)
        config = write_config(args, out, cuda)
        prepared = time.perf_counter() - t
        print(f"{args.model} ({args.layers or shape['num_hidden_layers']} layers), random bf16 weights "
              f"and data written in {prepared:.1f} s; batch {args.batch} x {args.seq}, {args.steps} "
              f"local steps, {args.ranks} rank(s), {'cuda bf16' if cuda else 'cpu fp32'}", flush=True)

        from pipeline.config import load_config
        from pipeline.plan.memory import GIB, plan_memory

        rows = plan_memory(load_config(str(config)), args.ranks)
        predicted = {row.tier: row.peak / GIB for row in rows}
        walls = run_killed_then_resumed(args, config, out / "run", env)
        t = time.perf_counter()
        subprocess.run(command(argparse.Namespace(ranks=1), "export", str(out / "run"), "--format", "merged",
                               "--out", str(out / "export")), env=env, cwd=REPO, check=True)
        walls["fedmoe export --format merged"] = time.perf_counter() - t
        from pipeline.eval.summary import load_summary

        timed = load_summary(out / "run")["time"]  # the report's sums of the run's timing events
        split, peaks = timed["phases"], timed["peak_memory_gib"]
        events = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        checkpointed = {}  # tier -> what its clients did (train.activation_checkpointing=auto)
        for e in events:
            if e["event"] == "client":
                checkpointed.setdefault(e["tier"], set()).add(e.get("checkpointing"))

        print("\nper-rank peak memory while training a client (GiB)")
        print(f"{'tier':6} {'ckpt plan':>9} {'ckpt run':>9} {'plan':>8} {'measured':>9} {'measured / plan':>16}")
        for row in rows:
            plan, got = predicted[row.tier], peaks.get(row.tier, float("nan"))
            ran = "/".join(sorted("on" if c else "off" for c in checkpointed.get(row.tier, ())))
            print(f"{row.tier:6} {'on' if row.checkpointed else 'off':>9} {ran:>9} {plan:8.2f} {got:9.2f} "
                  f"{got / plan:16.2f}")
        if not cuda:
            print("(CPU: the measured value is the process's peak RSS, interpreter and libraries included)")
        print("\nwall time, world rank 0 (timing events of both processes)")
        whole = sum(split.values())
        for phase in ("load", "train", "aggregate", "evaluate", "checkpoint", "export"):
            if phase in split:
                print(f"  {phase:11} {split[phase]:8.1f} s  {split[phase] / whole:6.1%}")
        print("processes, wall seconds:")
        for name, seconds in walls.items():
            print(f"  {name:30} {seconds:8.1f} s")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
