"""FedSmoothLoRA's per-client state: memory stays flat in the number of virtual clients.

Drives the `fedsmoothlora` strategy alone, with the shipped tiny OLMoE's adapter shapes: the base
weights, calibration gradients and local training are stand-ins (random tensors, as in
tests/unit/test_fedsmoothlora.py), so only the method's own bookkeeping is measured. Rounds of
`--per-round` clients run until every virtual client has trained twice (the second time it
round-matches from its state on disk). Per client count, in a fresh process each, it prints the
peak RSS, what the strategy's state holds (the merged delta and last server LoRA: fixed by the
model) and the state on disk (which does grow: one adapter per client).

    python bench/client_state.py [--clients 10 100 1000] [--per-round 10] [--no-ga]

The clients of one round are held together (their uploads' stacked factors until the server's
SVD), so memory follows `--per-round`, which stays fixed while the virtual clients grow.
`--no-ga` skips the stand-in calibration gradients (the slow part: a dense random tensor per
adapted weight per client), which are freed after each client either way.

Prints numbers, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(n_clients: int, per_round: int, root: str, ga: bool) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
    from pipeline.algorithms.client_store import RunStorage
    from pipeline.config import Tier
    from pipeline.model import build_model, init_adapter_state, patch_olmoe
    from pipeline.model.base_delta import lora_base_weights

    config = json.loads((REPO / "assets" / "tiny-olmoe" / "config.json").read_text())
    model = patch_olmoe(build_model(config, seed=0), lora_rank=8, lora_alpha=16.0)
    adapters = init_adapter_state(model, 0)
    shapes = {k: tuple(w.shape) for k, w in lora_base_weights(model).items()}
    del model
    tier = Tier(0, "t", 1.0, 8, 8, 1.0)
    info = ModelInfo(config["num_hidden_layers"], config["num_experts"], 8, 8, 16.0)
    s = build_strategy("fedsmoothlora", {"ga": ga}, info, [tier])
    s.init_state(adapters)
    s.total_rounds = 2 * -(-n_clients // per_round)
    s.attach_storage(RunStorage(Path(root) / "client_state"))
    gen = torch.Generator().manual_seed(0)

    class Ops:  # the model side, stood in for
        def set_base(self, deltas, low_rank=None):
            pass

        def calibration_batches(self, n, batch_size):
            return []

        def weight_gradients(self, setting, batches):
            return {k: torch.randn(v, generator=gen) for k, v in shapes.items()}

        def generator(self, *keys):
            return torch.Generator().manual_seed(sum(keys) % 65521)

    ops = Ops()
    round_ = 0
    for _ in range(2):
        for start in range(0, n_clients, per_round):
            round_ += 1
            s.prepare_round(ops, round_)
            sums = {}
            for client in range(start, min(start + per_round, n_clients)):
                plan = s.prepare_client(s.plan(client, round_, tier), ops)
                trained = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in plan.adapters.items()}
                update = ClientUpdate(client, round_, tier, 8, 8, trained, 10, torch.zeros(1, 1), 1)
                for k, v in s.contribution(update).items():
                    sums[k] = sums[k] + v if k in sums else v
            s.finalize(sums)
    held = sum(t.numel() * t.element_size() for t in s.state_dict()["tensors"].values())
    disk = sum(p.stat().st_size for p in (Path(root) / "client_state").iterdir())
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 
                      "held": held, "index": len(s.store.index), "disk": disk, "rounds": round_}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--no-ga", action="store_true", help="algorithm.options.ga=false")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2], args.child[3] == "ga")
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    print(f"fedsmoothlora (ga {'off' if args.no_ga else 'on'}), tiny OLMoE adapter shapes, "
          f"{args.per_round} clients a round, every client twice")
    print(f"{'clients':>8} {'rounds':>7} {'peak RSS MiB':>13} {'strategy state MiB':>19} {'state on disk MiB':>18}")
    for n in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(min(n, args.per_round)), tmp,
                                   "no-ga" if args.no_ga else "ga"],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{n} clients failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mib = 2 ** 20
            print(f"{n:>8} {r['rounds']:>7} {r['maxrss_kib'] / 1024:>13.0f} {r['held'] / mib:>19.1f} "
                  f"{r['disk'] / mib:>18.1f}", flush=True)


if __name__ == "__main__":
    main()
