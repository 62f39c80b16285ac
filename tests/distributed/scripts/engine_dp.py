"""Run under mpiexec: one client group over all ranks trains one client with the DeepSpeed
engine (data-parallel); every rank compares with a plain PyTorch loop on the whole batches.

argv: ZERO_STAGE TOL [BATCH_SIZE [DEEPSPEED_JSON]]. Exits non-zero (aborting the job) on a mismatch.
"""
import copy
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from pipeline.config import DeepSpeedConfig, TrainConfig  # noqa: E402
from pipeline.engine.client import ClientEngine, free_port, init_distributed  # noqa: E402
from pipeline.model import (adapter_parameters, build_model, init_adapter_state,  # noqa: E402
                            load_adapter_state, patch_olmoe, set_top_k, ModelSetting)

stage, tol = int(sys.argv[1]), float(sys.argv[2])
batch_size = int(sys.argv[3]) if len(sys.argv) > 3 else 5
ds_json = sys.argv[4] if len(sys.argv) > 4 else None
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
init_distributed(rank=rank, world_size=size, local_rank=rank,
                 master_port=comm.bcast(free_port() if rank == 0 else None))

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
              max_position_embeddings=64, eos_token_id=None, pad_token_id=0)
TRAIN = TrainConfig(local_steps=4, batch_size=batch_size, lr=1e-2, weight_decay=0.01,
                    grad_clip=1.0, max_length=12)

model = patch_olmoe(build_model(CONFIG, seed=0), lora_rank=4, lora_alpha=8.0)
pristine = copy.deepcopy(model)
gen = torch.Generator().manual_seed(3)
start = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in init_adapter_state(model, 3).items()}
batches = []
for _ in range(TRAIN.local_steps):
    ids = torch.randint(1, 64, (batch_size, TRAIN.max_length), generator=gen)
    labels = ids.clone()
    # uneven answer lengths per row, so a shard's token share differs from its row share
    for i in range(batch_size):
        labels[i, : TRAIN.max_length // 2 + i % 3] = -100
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

engine = ClientEngine(model, TRAIN, DeepSpeedConfig(zero_stage=stage, config=ds_json))
assert engine.dp_size == size
first_grads = {}


def keep_first_grads(m):
    # ZeRO 0 leaves the group-averaged gradient in p.grad until the step (ZeRO 1/2 do not).
    if stage == 0 and not first_grads:
        first_grads.update({k: p.grad.detach().clone() for k, p in adapter_parameters(m).items()})


result = engine.train(start, ModelSetting(2, 4), batches, after_backward=keep_first_grads)

# The single-process reference: plain AdamW on the whole batches.
ref = copy.deepcopy(pristine)
load_adapter_state(ref, start)
set_top_k(ref, 2)
params = adapter_parameters(ref)
opt = torch.optim.AdamW(list(params.values()), lr=TRAIN.lr, weight_decay=TRAIN.weight_decay)
losses, ref_first_grads = [], {}
for batch in batches:
    loss = ref(**batch).loss
    losses.append(loss.item())
    loss.backward()
    if not ref_first_grads:
        ref_first_grads = {k: p.grad.detach().clone() for k, p in params.items()}
    torch.nn.utils.clip_grad_norm_(list(params.values()), TRAIN.grad_clip)
    opt.step()
    opt.zero_grad()
from pipeline.model import expert_token_counts  # noqa: E402

worst = max(((result.adapters[k] - p.detach()).abs().max() / p.detach().abs().max()).item()
            for k, p in params.items())
moved = max((result.adapters[k] - start[k]).abs().max().item() for k in start)
counts_ok = torch.equal(result.expert_token_counts, expert_token_counts(ref))
loss_err = max(abs(a - b) / abs(b) for a, b in zip(result.losses, losses))
print(f"rank {rank}: worst relative adapter error {worst:.3g}, moved {moved:.3g}, "
      f"counts equal {counts_ok}, loss error {loss_err:.3g}", flush=True)
assert worst <= tol and moved > 1e-3 and counts_ok and loss_err <= tol, "data-parallel step differs"
if stage == 0:  # the gradient itself, scale included (Adam would hide a wrong scale)
    for k, g in ref_first_grads.items():
        err = ((first_grads[k] - g).norm() / g.norm()).item()
        assert err <= tol, f"{k}: gradient differs from the whole batch's by {err:.3g} (relative)"
everyone = comm.allgather({k: v.numpy().tobytes() for k, v in result.adapters.items()})
assert all(g == everyone[0] for g in everyone), "ranks of one group disagree"
