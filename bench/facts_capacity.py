"""Is top-k capacity on the knowledge suite? Fine-tune the shipped tiny OLMoE's adapters
centrally (no federation) at top-k 8 on `data.source: facts`, then score the same adapters
at top-k 8, 4, 2 and 1. Also runs the skills suite (`--suite offline`) for contrast.

    python bench/facts_capacity.py                         # expert LoRA only, 1600 steps
    python bench/facts_capacity.py --attention --steps 800 # expert + attention LoRA
    python bench/facts_capacity.py --routing               # the base router's concentration

Single thread, deterministic; output recorded in bench/results-facts.txt.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from pipeline.data import build_benchmark, build_facts, load_tokenizer
from pipeline.data.batching import collate
from pipeline.eval.scoring import evaluate_choices
from pipeline.model.adapters import adapter_parameters, set_top_k
from pipeline.model.build import load_model, patch_olmoe

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny-olmoe"


def scores(model, tokenizer, evals, train_k: int) -> dict[int, dict]:
    model.eval()
    out = {}
    for k in (8, 4, 2, 1):
        set_top_k(model, k)
        with torch.no_grad():
            out[k] = evaluate_choices(model, tokenizer, evals, batch_size=256)
    set_top_k(model, train_k)
    model.train()
    return out


def routing_mass(asset: Path) -> None:
    """How concentrated the base router is, and what lower top-k costs the base model."""
    from transformers import OlmoeForCausalLM

    from pipeline.data.batching import IGNORE_INDEX, pad_sequences
    from pipeline.data.tasks import pretraining_line

    model = OlmoeForCausalLM.from_pretrained(asset).eval()
    tokenizer = load_tokenizer(asset)
    rng = random.Random("bench/routing")
    ids = [tokenizer(pretraining_line(rng))["input_ids"] for _ in range(256)]
    x = pad_sequences(ids, tokenizer.pad_token_id)
    mask = pad_sequences([[1] * len(s) for s in ids], 0)
    labels = x.masked_fill(mask == 0, IGNORE_INDEX)
    losses = []
    for k in (8, 2, 1):
        for layer in model.model.layers:  # plain Hugging Face blocks
            layer.mlp.gate.top_k = k
        with torch.no_grad():
            losses.append(f"k={k}: {model(input_ids=x, attention_mask=mask, labels=labels).loss.item():.3f}")
    print("base model, LM loss on 256 pretraining lines:", "  ".join(losses))
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 8
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, output_router_logits=True)
    real = mask.flatten().bool()
    for i, logits in enumerate(out.router_logits):
        p = logits.float().softmax(-1)[real].sort(-1, descending=True).values
        print(f"  layer {i}: softmax mass of top-1 {p[:, 0].mean():.3f}, top-2 {p[:, :2].sum(-1).mean():.3f}, "
              f"top-8 {p[:, :8].sum(-1).mean():.3f}")


def line(tag: str, result: dict[int, dict]) -> str:
    cells = "  ".join(f"k={k}: {r['accuracy']:.3f}" for k, r in result.items())
    return f"{tag:>10}  {cells}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("facts", "offline"), default="facts")
    ap.add_argument("--attention", action="store_true", help="also LoRA on attention (default: experts only)")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--eval-per-family", type=int, default=100)
    ap.add_argument("--routing", action="store_true", help="only print the base router's concentration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.routing:
        routing_mass(ASSET)
        return
    torch.manual_seed(0)
    tokenizer = load_tokenizer(ASSET)
    model = patch_olmoe(load_model(str(ASSET)), 8, 16.0, expert_lora=True, attention_lora=args.attention)
    build = build_facts if args.suite == "facts" else build_benchmark
    train, evals = build(0, 400, args.eval_per_family)
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(0)
    print(f"suite {args.suite}, LoRA on experts{' + attention' if args.attention else ''}, top-k 8, "
          f"batch {args.batch_size}, lr {args.lr}; {len(evals)} eval prompts; chance 0.25 (skills: 0.281)")
    print(line("base", scores(model, tokenizer, evals, 8)), flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss = model(**collate(rng.sample(train, args.batch_size), tokenizer, 64)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            print(line(f"step {step}", scores(model, tokenizer, evals, 8)), flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
