"""Does top-k act as capacity? Memorise random facts in a small OLMoE at top-k K, then count
how many survive at lower top-k.

    python bench/capacity_probe.py                       # a small grid, one row per setting
    python bench/capacity_probe.py --keys 1024 --steps 800 --only-experts

Each fact maps a two-token key (as the offline suite's two-syllable names would) to one of 8
value tokens. The model trains full-batch with Adam at top-k K, then is scored at K, K/2, K/4
and 1 with the router untouched. `--only-experts` trains the experts and routers alone
(embeddings, attention and head stay at their random init), so the facts can live only in
the experts. The offline benchmark can show a capacity deficit only in a regime where the
rows below drop well under the trained K's accuracy.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

VALUES = 8


def build(args, norm_topk: bool) -> OlmoeForCausalLM:
    side = int(args.keys ** 0.5)
    config = OlmoeConfig(vocab_size=2 * side + VALUES + 2, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=norm_topk,
                         max_position_embeddings=16, eos_token_id=None, pad_token_id=0)
    return OlmoeForCausalLM(config)


def set_top_k(model, k: int) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


def probe(args, norm_topk: bool, only_experts: bool) -> dict:
    side = int(args.keys ** 0.5)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = build(args, norm_topk)
    first_value = 2 * side + 2
    keys = torch.tensor(list(itertools.product(range(2, 2 + side), range(2 + side, 2 + 2 * side))))
    values = torch.randint(first_value, first_value + VALUES, (len(keys),), generator=g)
    params = [p for n, p in model.named_parameters() if not only_experts or ".mlp." in n]
    if only_experts:
        for n, p in model.named_parameters():
            p.requires_grad_(".mlp." in n)
    opt = torch.optim.Adam(params, lr=args.lr)
    t0 = time.time()
    for _ in range(args.steps):
        logits = model(input_ids=keys).logits[:, -1]
        torch.nn.functional.cross_entropy(logits, values).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    result = {"seconds": time.time() - t0}
    for k in sorted({args.top_k, max(1, args.top_k // 2), max(1, args.top_k // 4), 1}, reverse=True):
        set_top_k(model, k)
        with torch.no_grad():
            predicted = model(input_ids=keys).logits[:, -1, first_value:].argmax(-1) + first_value
        result[k] = float((predicted == values).float().mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=256, help="facts (a square number: side x side keys)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=16, help="per expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only-experts", action="store_true", help="train experts and routers only")
    ap.add_argument("--grid", action="store_true", help="also vary norm_topk_prob and --only-experts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(False, args.only_experts)]
    if args.grid or not args.only_experts:
        settings = [(n, o) for o in (False, True) for n in (False, True)]
    print(f"{args.keys} facts, {args.experts} experts x {args.intermediate} at top-{args.top_k}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.steps} full-batch steps; chance {1 / VALUES:.3f}")
    for norm_topk, only_experts in settings:
        r = probe(args, norm_topk, only_experts)
        cells = "  ".join(f"k={k}: {r[k]:.3f}" for k in r if k != "seconds")
        print(f"norm_topk_prob={str(norm_topk):5}  trained={'experts' if only_experts else 'all':7}  {cells}  "
              f"({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
