"""Run under `mpiexec -n 2` (two client groups of one rank): a client that raises in one group
and a non-finite update in the other are dropped and logged by rank 0; the round completes
with what the others reported; with nobody left it fails on every rank, state intact.

argv: CONFIG RUN_DIR
"""
import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from pipeline.config import load_config
from pipeline.federation import assembly, rounds

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
cfg = load_config(sys.argv[1], ["logging.progress=false", "checkpoint.save_merged=false",
                                "federation.clients_per_round=3", "federation.min_clients=1",
                                "federation.collective_timeout=120"])
run_dir = Path(sys.argv[2])
fed = assembly.build(cfg, run_dir, None)
real = rounds.train_client
round_ = 1
clients = rounds.sample_clients(cfg.federation.clients, cfg.federation.clients_per_round, cfg.seed, round_)
tiers = [t.name for t in fed.client_tiers]
per_group = fed.topology.layout.assign(clients, tiers)
assert all(per_group), f"each group needs a client for this test: {per_group}"
raising, poisoned = per_group[0][0], per_group[1][0]
good = [c for c in clients if c not in (raising, poisoned)]
assert good, per_group


def faulty(fed_, client, r, progress):
    if client == raising:
        raise RuntimeError("simulated client crash")
    update = real(fed_, client, r, progress)
    if client == poisoned:
        key = next(iter(update.adapters))
        update.adapters[key] = update.adapters[key] * float("nan")
    return update


rounds.train_client = faulty
start = {k: v.clone() for k, v in fed.strategy.global_adapters.items()}
rounds.run_round(fed, round_, None)
after = {k: v.clone() for k, v in fed.strategy.global_adapters.items()}
# Every rank holds the same state, and it is the good clients' weighted average, as computed
# here from scratch (groups of one rank can train any client alone).
everyone = comm.allgather({k: v.numpy().tobytes() for k, v in after.items()})
assert all(e == everyone[0] for e in everyone), "ranks disagree after the round"
fed.strategy.global_adapters = start
updates = [real(fed, c, round_, None) for c in good]
weights = [u.n_samples for u in updates]
for k in after:
    want = sum(u.adapters[k].double() * w for u, w in zip(updates, weights)) / sum(weights)
    torch.testing.assert_close(after[k], want.float(), rtol=1e-6, atol=1e-7, msg=k)

# Nobody reports: RoundFailed on every rank, nothing changes.
rounds.train_client = lambda *a: (_ for _ in ()).throw(ValueError("all down"))
fed.strategy.global_adapters = {k: v.clone() for k, v in after.items()}
try:
    rounds.run_round(fed, 2, None)
except rounds.RoundFailed as exc:
    failed = str(exc)
else:
    failed = None
assert failed and "0 of 3 clients reported" in failed, failed
assert all(torch.equal(fed.strategy.global_adapters[k], after[k]) for k in after)
assert comm.allgather(failed) == [failed] * comm.Get_size()

comm.Barrier()
if rank == 0:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rejects = [(e["round"], e["client"]) for e in events if e["event"] == "reject"]
    assert (1, raising) in rejects and (1, poisoned) in rejects, rejects
    assert {(2, c) for c in rounds.sample_clients(cfg.federation.clients, 3, cfg.seed, 2)} <= set(rejects)
    logged = [e["client"] for e in events if e["event"] == "client"]
    assert logged == sorted(good), (logged, good)
    reason = next(e["reason"] for e in events if e["event"] == "reject" and e["client"] == raising)
    assert "simulated client crash" in reason
print(f"rank {rank}: ok", flush=True)
