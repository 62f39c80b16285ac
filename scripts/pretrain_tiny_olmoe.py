#!/usr/bin/env python
"""Pretrain the tiny OLMoE shipped in assets/tiny-olmoe (a few minutes on 2 CPU cores).

The model sees generic text in the surface format of the offline suite, but every task
line carries a random answer drawn independently of the gold one, so the base model knows
the format and what kind of token answers each prompt, yet sits near chance on the suite.
Fine-tuning then has something real to learn, and top-k changes how well it learns it.

    python scripts/pretrain_tiny_olmoe.py --out assets/tiny-olmoe [--seed 0] [--steps 1200]

Deterministic for a given seed and thread count. Writes a normal Hugging Face model
directory (weights in bfloat16 to stay small; config.json says float32 so that
`from_pretrained` returns a float32 model) plus `base_accuracy.json` and `pretrain.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402

from pipeline.data import FAMILIES, FAMILY_CHANCE, build_benchmark, build_word_tokenizer, load_tokenizer  # noqa: E402
from pipeline.data.batching import IGNORE_INDEX, pad_sequences  # noqa: E402
from pipeline.data.tasks import pretraining_line, suite_vocabulary  # noqa: E402
from pipeline.eval.scoring import evaluate_choices  # noqa: E402

# The suite every base-accuracy number in assets/README.md refers to.
EVAL_SEED = 0
EVAL_PER_FAMILY = 200


def tiny_config(vocab_size: int, pad_id: int, bos_id: int) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=64,  # per expert
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=32,
        num_experts_per_tok=8,
        max_position_embeddings=256,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=None,  # the OLMoE default (50279) is outside a tiny vocabulary
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
    )


def set_top_k(model, k: int) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


def make_batch(rng: random.Random, tokenizer, batch_size: int) -> dict[str, torch.Tensor]:
    ids = [tokenizer(pretraining_line(rng))["input_ids"] for _ in range(batch_size)]
    input_ids = pad_sequences(ids, tokenizer.pad_token_id)
    attention_mask = pad_sequences([[1] * len(s) for s in ids], 0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, tokenizer, args) -> list[float]:
    rng = random.Random(f"fedmoe/pretrain/{args.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    losses = []
    columns = [TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task("pretrain", total=args.steps, loss=float("nan"))
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
            out = model(**make_batch(rng, tokenizer, args.batch_size))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            bar.update(task, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
    return losses


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # users get plain logits and LM loss
    model.to(torch.bfloat16).save_pretrained(out)
    # Weights stay bfloat16 on disk; declare float32 so `from_pretrained` upcasts by default.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def base_accuracy(out: Path) -> dict:
    """Accuracy of the saved model (as users load it) on the eval suite at top_k 8 and 2."""
    model = OlmoeForCausalLM.from_pretrained(out)
    tokenizer = load_tokenizer(out)
    _, evals = build_benchmark(EVAL_SEED, 0, EVAL_PER_FAMILY)
    result = {"eval_seed": EVAL_SEED, "eval_per_family": EVAL_PER_FAMILY,
              "chance": sum(FAMILY_CHANCE[f] for f in FAMILIES) / len(FAMILIES), "top_k": {}}
    for k in (8, 2):
        set_top_k(model, k)
        result["top_k"][str(k)] = evaluate_choices(model, tokenizer, evals, batch_size=256)
    return result


def markdown_table(acc: dict) -> str:
    rows = ["| family | chance | top_k 8 | top_k 2 |", "|---|---|---|---|"]
    for fam in FAMILIES:
        rows.append(f"| {fam} | {FAMILY_CHANCE[fam]:.2f} | {acc['top_k']['8']['per_family'][fam]:.3f} "
                    f"| {acc['top_k']['2']['per_family'][fam]:.3f} |")
    rows.append(f"| **all** | {acc['chance']:.3f} | {acc['top_k']['8']['accuracy']:.3f} "
                f"| {acc['top_k']['2']['accuracy']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2, help="fixed for bitwise reproducibility")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = build_word_tokenizer(suite_vocabulary())
    config = tiny_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id)
    config.output_router_logits = True  # load-balancing loss while pretraining: all experts get used
    model = OlmoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny OLMoE: {n_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}")

    t0 = time.time()
    losses = pretrain(model, tokenizer, args)
    seconds = time.time() - t0
    save(model, tokenizer, args.out)
    acc = base_accuracy(args.out)
    (args.out / "base_accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")
    meta = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "threads": args.threads, "seconds": round(seconds, 1), "parameters": n_params,
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    (args.out / "pretrain.json").write_text(json.dumps(meta, indent=2) + "\n")

    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"\npretrained {args.steps} steps in {seconds:.0f} s, final loss {meta['final_loss']}, "
          f"saved {size:.1f} MB to {args.out}")
    print(f"\nBase accuracy on the eval suite (seed {EVAL_SEED}, {EVAL_PER_FAMILY} per family):\n")
    print(markdown_table(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
