"""One implementation of the peer workload (bench/peer_workload.py) per process, for
bench/peer_flower.py, which starts each as a fresh process and measures it from outside.

    python bench/peer_runs.py plain  --out F.safetensors --threads 2
    python bench/peer_runs.py fedmoe --out F.safetensors --threads 2 --run-dir DIR
    mpiexec -n 2 python -m mpi4py bench/peer_runs.py fedmoe --out F.safetensors --threads 1 --run-dir DIR
    python bench/peer_runs.py flower --out F.safetensors --threads 1 --actors 2

Each writes the final adapters (fedmoe's names) to --out and prints one JSON line last:
{"rounds": [seconds per round], "setup": seconds from process start to round 1}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # as near the process start as Python gets; imports come after

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_workload as w  # noqa: E402


def report(rounds: list[float], setup: float, out: str, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, out)
    print(json.dumps({"rounds": rounds, "setup": setup}), flush=True)


def run_plain(args) -> None:
    """The baseline: peft on Hugging Face's model, clients one after another, FedAvg."""
    model = w.peft_model()
    slots = w.peft_slots(model)
    data = w.RandomTokens()
    state = w.initial_adapters()
    setup = time.perf_counter() - T0
    rounds = []
    for r in range(1, w.ROUNDS + 1):
        t = time.perf_counter()
        states = [w.train_peft_client(model, slots, state, data.client_batches(r, c)) for c in range(w.CLIENTS)]
        state = w.fedavg(states, [w.ROWS] * w.CLIENTS)
        rounds.append(time.perf_counter() - t)
    report(rounds, setup, args.out, state)


def fedmoe_config(placement: str = "tier"):
    from pipeline.config import config_from_dict, config_to_dict, load_config

    raw = config_to_dict(load_config(None))
    raw.update(seed=w.SEED)
    raw["model"]["lora"].update(rank=w.RANK, alpha=w.ALPHA, experts=True, attention=True)
    raw["tiers"] = [{"name": "all", "budget": 1.0, "share": 1.0, "ranks": 1}]
    raw["federation"].update(clients=w.CLIENTS, clients_per_round=w.CLIENTS, rounds=w.ROUNDS, min_clients=1,
                             placement=placement)
    raw["algorithm"] = {"name": "fedavg", "options": {}}
    raw["train"].update(local_steps=w.STEPS, batch_size=w.BATCH, lr=w.LR, grad_clip=w.GRAD_CLIP,
                        weight_decay=0.0, max_length=w.SEQ)
    raw["logging"].update(tensorboard=False, progress=False)
    return config_from_dict(raw)


def run_fedmoe(args) -> None:
    """fedmoe's own round loop (`run_round`: the DeepSpeed client engine, the strategy, the
    cross-group sum under MPI) on the bench's model and data; no evaluation or checkpoints,
    which the other two do not do either."""
    from pipeline.federation import assembly
    from pipeline.federation.rounds import run_round
    from pipeline.model import patch_olmoe

    cfg = fedmoe_config(args.placement)
    model = patch_olmoe(w.base_model(), lora_rank=w.RANK, lora_alpha=w.ALPHA)
    parts = assembly.setup(cfg, loaded=(model, None), data=w.RandomTokens())
    os.makedirs(args.run_dir, exist_ok=True)
    fed = assembly.build(cfg, Path(args.run_dir), None, parts)
    setup = time.perf_counter() - T0
    rounds = []
    for r in range(1, w.ROUNDS + 1):
        t = time.perf_counter()
        run_round(fed, r, None)
        rounds.append(time.perf_counter() - t)
    if fed.writes:
        report(rounds, setup, args.out, fed.strategy.global_adapters)


def run_flower(args) -> None:
    """Flower's simulation engine (Ray actors): the same client loop in a ClientApp, Flower's
    FedAvg in a ServerApp; the model is built once per actor and reused, as a careful user would."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client_app = ClientApp()
    client_app.train()(w.flower_train)
    server_app = ServerApp()
    marks: list[float] = []
    final: dict = {}

    @server_app.main()
    def main(grid, context):
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=w.CLIENTS,
                          min_available_nodes=w.CLIENTS)

        def at_round_end(round_, arrays):  # Flower calls it before round 1 and after each round
            marks.append(time.perf_counter())
            if round_ == w.ROUNDS:
                final.update(arrays.to_torch_state_dict())
            return None

        strategy.start(grid, ArrayRecord(torch_state_dict=w.initial_adapters()), num_rounds=w.ROUNDS,
                       evaluate_fn=at_round_end)

    os.environ.update(OMP_NUM_THREADS=str(args.threads), PEER_THREADS=str(args.threads))  # actors inherit them
    run_simulation(server_app, client_app, num_supernodes=w.CLIENTS,
                   backend_config={"init_args": {"num_cpus": args.actors * args.threads, "include_dashboard": False},
                                   "client_resources": {"num_cpus": args.threads, "num_gpus": 0.0}})
    # setup: up to round 1's start, i.e. Ray's start, the actors' spawn and the server's start
    rounds = [b - a for a, b in zip(marks, marks[1:])]
    report(rounds, marks[0] - T0, args.out, final)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("impl", choices=["plain", "fedmoe", "flower"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--placement", default="tier", help="fedmoe: federation.placement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"plain": run_plain, "fedmoe": run_fedmoe, "flower": run_flower}[args.impl](args)


if __name__ == "__main__":
    main()
