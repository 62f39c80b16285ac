"""What same-seed-same-bits costs: a local step with the deterministic path against the
order-dependent one it replaced, measured alternately in one process.

    python bench/determinism.py                 # shipped tiny OLMoE, CPU, torch's default threads
    python bench/determinism.py --threads 2 --repeats 5

`deterministic` is the default path (rows gathered with index_select, torch's deterministic
mode on, which also fills every new uninitialised tensor with NaN); `no-fill` the same without
that fill (`torch.utils.deterministic.fill_uninitialized_memory`); `previous` gathers rows with tensor indexing (whose CPU
backward accumulates in thread order) with the mode off. Both train the same client from the same adapters; the
script prints the median step time of each and their ratio, and whether each path gave the
same adapters twice.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/tiny-olmoe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements of each path")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    from pipeline.config import DeepSpeedConfig, TrainConfig
    from pipeline.engine.client import ClientEngine, init_distributed
    from pipeline.model import ModelSetting, init_adapter_state, load_model, patch_olmoe
    from pipeline.model import moe_block

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = patch_olmoe(load_model(args.model, dtype=torch.float32), lora_rank=8, lora_alpha=16.0)
    init_distributed()
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr=1e-3, max_length=args.seq)
    engine = ClientEngine(model, train, DeepSpeedConfig(zero_stage=0))
    start = init_adapter_state(engine.model, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    gather = moe_block.gather_rows
    paths = {"deterministic": (gather, True, True), "no-fill": (gather, True, False),
             "previous": (lambda x, index: x[index], False, False)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, (gather_fn, mode, fill) in paths.items():
            moe_block.gather_rows = gather_fn
            torch.use_deterministic_algorithms(mode)
            torch.utils.deterministic.fill_uninitialized_memory = fill
            steps = []

            def on_step(step, loss, _t=[time.perf_counter()]):
                now = time.perf_counter()
                steps.append(now - _t[0])
                _t[0] = now

            on_step.__defaults__[0][0] = time.perf_counter()
            out = engine.train(start, ModelSetting(args.top_k, 8), [batch] * args.steps, on_step=on_step)
            times[name].extend(steps[1:])  # the first step warms the allocator
            results[name].append(out.adapters)
    moe_block.gather_rows = gather
    print(f"{args.model}: batch {args.batch} x {args.seq}, top-{args.top_k}, "
          f"{torch.get_num_threads()} threads, {args.repeats} x {args.steps} steps per path")
    base = statistics.median(times["previous"])
    for name in paths:
        t = statistics.median(times[name])
        runs = results[name]
        same = all(torch.equal(runs[0][k], r[k]) for r in runs[1:] for k in runs[0])
        print(f"{name:>14}: {t * 1e3:7.1f} ms/step  ({t / base:.3f}x previous)  "
              f"same adapters every repeat: {same}")


if __name__ == "__main__":
    main()
