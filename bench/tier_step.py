"""Local-step time per tier through our DeepSpeed client, beside the FLOP ratio.

The model is patched with our block and LoRA and trained through the same `ClientEngine` a
federated client uses. For each top-k it prints the measured step time and its ratio to the
first top-k beside the training-FLOP ratio counted from the routed tokens (and peak GPU memory
on CUDA). Ratios, not assertions.

    python bench/tier_step.py                                   # shipped tiny OLMoE, CPU, fp32
    python bench/tier_step.py --model olmoe-1b-7b --batch 16 --seq 1024   # random OLMoE-1B-7B, GPU, bf16

`olmoe-1b-7b` builds the published architecture (16 layers, 64 experts of intermediate 1024,
top-8, hidden 2048) with random weights in bf16: about 72 GiB at batch 16 x 1024, K=8.

Throughput: tokens/s and model FLOPs utilisation, the training FLOPs a step needs (counted
from the routed tokens by pipeline.model.flops: frozen weights forward + input gradient,
adapters forward + both gradients) per second over the device's dense peak, `--peak-tflops`
or, for common GPUs, looked up by name (bf16 on CUDA); without a peak the MFU column is empty.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak(cuda: bool, given: float | None) -> float | None:
    """Peak FLOP/s: the one given, else the table's entry for this GPU, else None."""
    if given:
        return given * 1e12
    if not cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/tiny-olmoe", help="a local HF directory, or olmoe-1b-7b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--top-k", type=int, nargs="+", default=[8, 6, 4, 2], help="the tiers' top-k, first = reference")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than 16 for a quick look")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak TFLOP/s for MFU (default: known GPUs' bf16 peak)")
    args = ap.parse_args()
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from pipeline.config import DeepSpeedConfig, TrainConfig
    from pipeline.engine.client import ClientEngine, init_distributed
    from pipeline.model import (ModelSetting, adapter_parameters, flops_per_token, init_adapter_state, load_model,
                                patch_olmoe)
    from pipeline.model.build import OLMOE_1B_7B

    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "olmoe-1b-7b":
        if not cuda:
            raise SystemExit("olmoe-1b-7b needs a CUDA GPU (about 72 GiB at batch 16 x 1024)")
        config = OlmoeConfig(**OLMOE_1B_7B)
        if args.layers:
            config.num_hidden_layers = args.layers
        with torch.device("cuda"):
            model = OlmoeForCausalLM(config).to(torch.bfloat16)
            with torch.no_grad():
                for layer in model.model.layers:  # transformers may start the router at zero
                    layer.mlp.gate.weight.normal_(0, 0.02)
    else:
        model = load_model(args.model, dtype=torch.bfloat16 if cuda else torch.float32)
        config = model.config
    patch_olmoe(model, lora_rank=args.rank, lora_alpha=2.0 * args.rank)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in adapter_parameters(model).values())
    device = "cuda bf16" if cuda else f"cpu fp32, {torch.get_num_threads()} threads"
    print(f"{args.model}: {config.num_hidden_layers} layers, {config.num_experts} experts, "
          f"{base / 1e9:.3f} B frozen parameters, {adapters / 1e6:.2f} M adapter parameters "
          f"(LoRA r={args.rank}); batch {args.batch} x {args.seq} tokens, {device}, ZeRO {args.zero}")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    init_distributed()
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr=1e-4, max_length=args.seq,
                        precision="bf16" if cuda else "fp32")
    engine = ClientEngine(model, train, DeepSpeedConfig(zero_stage=args.zero))
    start = init_adapter_state(engine.model, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    rows = []
    for k in args.top_k:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []

        def on_step(step, loss, _t=[time.perf_counter()]):
            sync()
            now = time.perf_counter()
            times.append(now - _t[0])
            _t[0] = now

        result = engine.train(start, ModelSetting(k, args.rank), [batch] * args.steps, on_step=on_step,
                              checkpointing=args.checkpointing)
        counts = result.expert_token_counts
        routed = counts.sum(dim=1).mean().item() / (args.steps * args.batch * args.seq)
        flops = flops_per_token(config, top_k=routed, lora_rank=args.rank, seq_len=args.seq)["train"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append((k, statistics.median(times[2:]), flops, peak))
    k_top, t_top, f_top, _ = rows[0]
    peak = device_peak(cuda, args.peak_tflops)
    tokens = args.batch * args.seq
    print(f"peak: {peak / 1e12:g} TFLOP/s" if peak else "peak: unknown (pass --peak-tflops for MFU)")
    print(f"{'top-k':>5} {'step s':>8} {'time vs K=' + str(k_top):>12} {'FLOPs vs K=' + str(k_top):>13} "
          f"{'MFLOP/token':>12} {'tokens/s':>10} {'MFU %':>6} {'peak GiB':>9}")
    for k, t, f, mem in rows:
        mfu = f"{100 * f * tokens / t / peak:>6.1f}" if peak else f"{'-':>6}"
        print(f"{k:>5} {t:>8.3f} {t / t_top:>12.2f} {f / f_top:>13.2f} {f / 1e6:>12.1f} {tokens / t:>10.0f} "
              f"{mfu} {mem:>9.1f}")


if __name__ == "__main__":
    main()
