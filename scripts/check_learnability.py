#!/usr/bin/env python
"""Check that the shipped tiny OLMoE can learn every family of the offline suite.

For each top_k (default 8 and 2): load the base model, set `gate.top_k` on every layer,
attach peft LoRA to attention and to the experts, fine-tune on the suite's training set with
the answer-only loss for a fixed time budget, and print accuracy before/after per family.
The product's demo relies on every family rising clearly above chance at every K.

    python scripts/check_learnability.py [--model assets/tiny-olmoe] [--seconds 60] [--top-k 8 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from transformers import OlmoeForCausalLM  # noqa: E402

from pipeline.data import FAMILIES, FAMILY_CHANCE, build_benchmark, collate, load_tokenizer  # noqa: E402
from pipeline.eval.scoring import evaluate_choices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def set_top_k(model, k: int) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


def lora_model(base, rank: int):
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    return get_peft_model(base, config)


def finetune(model, tokenizer, train, args, label: str) -> int:
    """Answer-only LoRA training for `args.seconds` (or `args.max_steps`); returns steps done."""
    rng = random.Random(f"fedmoe/learnability/{args.seed}")
    order = list(range(len(train)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    steps, pos, t0 = 0, len(order), time.time()
    columns = [TextColumn(label), BarColumn(), TextColumn("{task.fields[steps]} steps, loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=args.seconds, steps=0, loss=float("nan"))
        while time.time() - t0 < args.seconds and steps < args.max_steps:
            if pos + args.batch_size > len(order):
                rng.shuffle(order)
                pos = 0
            batch = collate([train[i] for i in order[pos : pos + args.batch_size]], tokenizer, max_length=64)
            pos += args.batch_size
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            bar.update(task, completed=min(time.time() - t0, args.seconds), steps=steps, loss=float(loss.detach()))
    return steps


def run_one(k: int, args, train, evals) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    base = OlmoeForCausalLM.from_pretrained(args.model)
    set_top_k(base, k)
    before = evaluate_choices(base, tokenizer, evals, batch_size=256)
    model = lora_model(base, args.rank)
    steps = finetune(model, tokenizer, train, args, f"K={k}")
    after = evaluate_choices(model, tokenizer, evals, batch_size=256)
    return {"top_k": k, "steps": steps, "before": before, "after": after}


def report(results: list[dict]) -> str:
    head = "| family | chance | " + " | ".join(f"K={r['top_k']} before | K={r['top_k']} after" for r in results) + " |"
    rows = [head, "|---" * (2 + 2 * len(results)) + "|"]
    for fam in FAMILIES:
        cells = [f"{r[w]['per_family'][fam]:.3f}" for r in results for w in ("before", "after")]
        rows.append(f"| {fam} | {FAMILY_CHANCE[fam]:.2f} | " + " | ".join(cells) + " |")
    chance = sum(FAMILY_CHANCE.values()) / len(FAMILY_CHANCE)
    cells = [f"{r[w]['accuracy']:.3f}" for r in results for w in ("before", "after")]
    rows.append(f"| **all** | {chance:.3f} | " + " | ".join(cells) + " |")
    rows.append("")
    rows += [f"K={r['top_k']}: {r['steps']} steps in {r['seconds']:.0f} s" for r in results]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "assets" / "tiny-olmoe")
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 2])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000, help="training examples per family")
    p.add_argument("--n-eval", type=int, default=200, help="eval examples per family")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    train, evals = build_benchmark(args.seed, args.n_train, args.n_eval)
    results = []
    for k in args.top_k:
        t0 = time.time()
        res = run_one(k, args, train, evals)
        res["seconds"] = time.time() - t0
        results.append(res)
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    # Fail loudly if a family did not learn: the demo depends on it.
    weak = [(r["top_k"], f) for r in results for f in FAMILIES
            if r["after"]["per_family"][f] < FAMILY_CHANCE[f] + 0.1]
    if weak:
        print("\nfamilies within 0.10 of chance after fine-tuning: " + ", ".join(f"{f} (K={k})" for k, f in weak))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
