"""Forward+backward time of HeteroMoEBlock against the Hugging Face OLMoE block.

Prints ratios, asserts nothing:
1. ours (expert LoRA on) / HF with peft's expert LoRA (`target_parameters` on the fused
   `gate_up_proj` and `down_proj`, the same LoRA values): like for like, goal <= 1.0; and
   ours / HF without LoRA (`grouped_mm` experts, frozen weights), at full top-k, same weights
   and batch.
2. ours at K_max/4 / ours at K_max, beside the FLOP ratio computed from the routed counts;
   goal: time ratio <= 1.15 x FLOP ratio, on a shape where the experts dominate.

    python bench/moe_block.py [--threads 1] [--device cuda --dtype bfloat16]

The default shape (1024 tokens, H 1024, I 512, 16 experts, K_max 8) keeps 128 rows per
expert at K_max/4, so the GEMMs stay efficient and the experts dominate; about 35 s on two
quiet cores. On a machine shared with other jobs pass `--threads 1`: with more threads than
free cores every small op waits at an OpenMP barrier and the numbers mean little.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from pipeline.model import HeteroMoEBlock


def step(block, x, grad, top_k=None):
    """One forward + backward (input and adapter gradients); returns its seconds."""
    if top_k is not None:
        block.top_k = top_k
    xi = x.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    block(xi).backward(grad)
    sync()
    elapsed = time.perf_counter() - t0
    block.zero_grad(set_to_none=True)
    return elapsed


def interleaved_medians(cases: dict, warmup: int, iters: int) -> dict:
    """Median seconds per case; cases run in turn within each iteration, so that load from
    other processes on a shared machine hits them alike."""
    times = {name: [] for name in cases}
    for i in range(warmup + iters):
        for name, fn in cases.items():
            t = fn()
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peft_expert_lora(hf: OlmoeSparseMoeBlock, ours: HeteroMoEBlock, rank: int, alpha: float):
    """A copy of HF's block with peft's LoRA on its fused expert weights, holding ours' values.

    peft stacks a 3-D parameter's experts into one nn.Linear pair: A [r*E, in] (row e*r + k),
    B [out, r*E] (column k*E + e); ours are [E, r, in] and [E, out, r].
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper

    block = copy.deepcopy(hf)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    inject_adapter_in_model(config, block)
    mod = block.experts
    with torch.no_grad():
        while isinstance(mod, ParamWrapper):
            short = {"gate_up_proj": "gate_up", "down_proj": "down"}[mod.parameter_name]
            a, b = getattr(ours, f"lora_{short}_A"), getattr(ours, f"lora_{short}_B")
            mod.lora_A["default"].weight.copy_(a.reshape(-1, a.shape[-1]))
            mod.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
            mod = mod.base_layer
    return block


def block_flops(n_tokens: int, routed: int, cfg: OlmoeConfig, rank: int) -> float:
    """Forward + backward FLOPs of the block, by pipeline.model.flops' rules, from routed pairs."""
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    router = 2 * n_tokens * H * E
    experts = routed * (2 * H * 2 * I + 2 * I * H)
    lora = routed * 2 * rank * ((H + 2 * I) + (I + H))
    return 2 * (router + experts) + 3 * lora  # frozen: fwd + 1x bwd; adapters: fwd + 2x bwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = OlmoeConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_experts=args.experts, num_experts_per_tok=args.top_k, eos_token_id=None)
    cfg._experts_implementation = "grouped_mm"  # HF's default experts kernel
    hf = OlmoeSparseMoeBlock(cfg)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.02)
        hf.experts.gate_up_proj.normal_(0, 0.02)
        hf.experts.down_proj.normal_(0, 0.02)
    hf.requires_grad_(False)  # frozen base, as in adapter fine-tuning

    dtype = getattr(torch, args.dtype)
    hf.to(args.device, dtype)
    ours = HeteroMoEBlock(copy.deepcopy(hf), lora_rank=args.rank, lora_alpha=2.0 * args.rank)
    with torch.no_grad():  # non-zero B, so the LoRA path does real work
        ours.lora_gate_up_B.normal_(0, 0.02)
        ours.lora_down_B.normal_(0, 0.02)
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype)

    print(f"shape: tokens={args.tokens} H={args.hidden} I={args.intermediate} E={args.experts} "
          f"K_max={args.top_k} LoRA r={args.rank}; {args.device} {args.dtype}, "
          f"threads={torch.get_num_threads()}; "
          f"median of {args.iters} after {args.warmup} warmup")

    plain = HeteroMoEBlock(copy.deepcopy(hf), expert_lora=False)
    hf_lora = peft_expert_lora(hf, ours, args.rank, 2.0 * args.rank)
    with torch.no_grad():  # the same function: a check that the pair is like for like
        gap = (hf_lora(x) - ours(x)).abs().max().item() / ours(x).abs().max().item()
    grad = torch.randn_like(x)
    k_low = max(1, args.top_k // 4)
    routed = {}

    def ours_at(k):
        def run():
            ours.token_counts.zero_()
            t = step(ours, x, grad, top_k=k)
            routed[k] = int(ours.token_counts.sum())
            return t
        return run

    t = interleaved_medians({
        "hf": lambda: step(hf, x, grad),
        "hf_lora": lambda: step(hf_lora, x, grad),
        "ours": ours_at(args.top_k),
        "ours_no_lora": lambda: step(plain, x, grad),
        "ours_low": ours_at(k_low),
    }, args.warmup, args.iters)

    print(f"[1] full top-k {args.top_k}, expert LoRA on both: HF + peft {t['hf_lora'] * 1e3:.1f} ms, ours "
          f"{t['ours'] * 1e3:.1f} ms -> ours/(HF + peft) = {t['ours'] / t['hf_lora']:.3f}  (goal <= 1.0; "
          f"outputs agree to {gap:.1e} relative)")
    print(f"    HF without LoRA {t['hf'] * 1e3:.1f} ms -> ours with LoRA / HF without = "
          f"{t['ours'] / t['hf']:.3f}")
    print(f"    same dispatch without LoRA: {t['ours_no_lora'] * 1e3:.1f} ms -> "
          f"{t['ours_no_lora'] / t['hf']:.3f} x HF")
    flops = {k: block_flops(args.tokens, routed[k], cfg, args.rank) for k in routed}
    time_ratio = t["ours_low"] / t["ours"]
    flop_ratio = flops[k_low] / flops[args.top_k]
    print(f"[2] ours top-k {k_low} vs {args.top_k}: {t['ours_low'] * 1e3:.1f} ms vs "
          f"{t['ours'] * 1e3:.1f} ms -> time ratio {time_ratio:.3f}, FLOP ratio "
          f"{flop_ratio:.3f} (routed pairs {routed[k_low]} vs {routed[args.top_k]}); "
          f"time/FLOP ratio = {time_ratio / flop_ratio:.3f}  (goal <= 1.15)")

if __name__ == "__main__":
    main()
