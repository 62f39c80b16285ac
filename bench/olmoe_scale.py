"""OLMoE-1B-7B scale on one GPU: local-step time and peak memory of our DeepSpeed client per tier.

A randomly initialised OLMoE-1B-7B (its published config: 16 layers, 64 experts of
intermediate 1024, top-8, hidden 2048) in bf16, patched with our block and LoRA, trained through the same
`ClientEngine` a federated client uses (DeepSpeed bf16, ZeRO from --zero). For each top-k it
prints the measured step time and its ratio to K_max beside the FLOP ratio counted from the
routed tokens, and the peak GPU memory. Ratios, not assertions. Needs a CUDA GPU (about 40 GB).

    python bench/olmoe_scale.py --batch 4 --seq 512 --top-k 8 6 4 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--top-k", type=int, nargs="+", default=[8, 6, 4, 2])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than 16 for a quick look")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/olmoe_scale.py needs a CUDA GPU")

    from transformers import OlmoeConfig, OlmoeForCausalLM

    from pipeline.config import DeepSpeedConfig, TrainConfig
    from pipeline.engine.client import ClientEngine, init_distributed
    from pipeline.model import adapter_parameters, flops_per_token, init_adapter_state, patch_olmoe
    from pipeline.model.build import OLMOE_1B_7B

    config = OlmoeConfig(**OLMOE_1B_7B)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OlmoeForCausalLM(config).to(torch.bfloat16)
        with torch.no_grad():
            for layer in model.model.layers:  # transformers may start the router at zero
                layer.mlp.gate.weight.normal_(0, 0.02)
    patch_olmoe(model, lora_rank=args.rank, lora_alpha=2.0 * args.rank)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in adapter_parameters(model).values())
    print(f"OLMoE-1B-7B architecture, {config.num_hidden_layers} layers: {base / 1e9:.2f} B frozen "
          f"parameters, {adapters / 1e6:.1f} M adapter parameters (LoRA r={args.rank}); "
          f"batch {args.batch} x {args.seq} tokens, bf16, ZeRO {args.zero}")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    init_distributed(backend="nccl")
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr=1e-4, max_length=args.seq,
                        precision="bf16")
    engine = ClientEngine(model, train, DeepSpeedConfig(zero_stage=args.zero))
    start = init_adapter_state(engine.model, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    rows = []
    for k in args.top_k:
        torch.cuda.reset_peak_memory_stats()
        times = []

        def on_step(step, loss, _t=[time.perf_counter()]):
            torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - _t[0])
            _t[0] = now

        result = engine.train(start, k, args.rank, [batch] * args.steps, on_step=on_step)
        counts = result.expert_token_counts
        routed = counts.sum(dim=1).mean().item() / (args.steps * args.batch * args.seq)
        flops = flops_per_token(config, top_k=routed, lora_rank=args.rank, seq_len=args.seq)["train"]
        rows.append((k, statistics.median(times[2:]), flops, torch.cuda.max_memory_allocated() / 2**30))
    k_top, t_top, f_top, _ = rows[0]
    print(f"{'top-k':>5} {'step s':>8} {'time vs K=' + str(k_top):>12} {'FLOPs vs K=' + str(k_top):>13} "
          f"{'GFLOP/token':>12} {'peak GiB':>9}")
    for k, t, f, mem in rows:
        print(f"{k:>5} {t:>8.3f} {t / t_top:>12.2f} {f / f_top:>13.2f} {f / 1e9:>12.2f} {mem:>9.1f}")


if __name__ == "__main__":
    main()
