"""Expert parallelism over 2 gloo processes: the same block outputs and gradients as one process."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import build_model, lora_base_weights, patch_olmoe, set_base_delta
from pipeline.model.adapters import is_expert_adapter
from pipeline.model.base_delta import expert_base_keys
from pipeline.engine.expert_parallel import ExpertParallel
from pipeline.model.routing import moe_blocks

from .conftest import SMALL_OLMOE

CONFIG = SMALL_OLMOE


def _model():
    model = patch_olmoe(build_model(CONFIG, seed=0), lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if is_expert_adapter(name):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _reference(x):
    model = _model()
    block = moe_blocks(model)[0]
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, block.token_counts.clone()


def _worker(rank, port, x, want, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        ep = ExpertParallel(dist.group.WORLD)
        ep.apply(model)
        block = moe_blocks(model)[0]
        assert block.lora_gate_up_A.shape[0] == 4 and block.experts.down_proj.shape[0] == 4
        rows = x.shape[0] // 2
        mine = x[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
        y = block(mine)
        weight = torch.linspace(-1, 1, want[0].numel()).view_as(want[0])[rank * rows:(rank + 1) * rows]
        (y * weight).sum().backward()
        torch.testing.assert_close(y.detach(), want[0][rank * rows:(rank + 1) * rows])
        torch.testing.assert_close(mine.grad, want[1][rank * rows:(rank + 1) * rows])
        for name, p in block.named_parameters():
            if p.grad is None:
                continue
            if name.startswith("lora_") or name.startswith("experts."):  # local experts' share
                torch.testing.assert_close(p.grad, ep.local_rows(want[2][name]), msg=name)
            else:  # router: each rank has its tokens' share of the gradient
                total = p.grad.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, want[2][name], msg=name)
        counts = block.token_counts.clone()
        dist.all_reduce(counts)
        assert torch.equal(counts, want[3])
        full = ep.gather(block.lora_down_B)
        with ep.gathered(model):
            assert torch.equal(block.lora_down_B, full) and block.token_exchange is None
            assert block.expert_range == (0, 8)
            if rank == 0:  # one rank alone computes with all experts
                torch.testing.assert_close(block(x).detach(), want[0])
        assert block.token_exchange is ep and block.lora_down_B.shape[0] == 4
        assert block.expert_range == (4 * rank, 4 * rank + 4)
        _check_base_deltas(model, ep, rank)
        queue.put((rank, None))
    except BaseException as exc:  # noqa: BLE001
        queue.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def _check_base_deltas(model, ep, rank):
    """FLoRA/FedEx-LoRA deltas (full `[E, ...]`) on expert-parallel blocks: each rank adds its
    experts' rows; inside ExpertParallel.gathered a delta applies to the full weights, outside it the
    pristine local slices come back."""
    whole = lora_base_weights(_model())  # one process's pristine weights, every expert
    experts = expert_base_keys(model)
    deltas = {k: torch.randn(w.shape, generator=torch.Generator().manual_seed(i))
              for i, (k, w) in enumerate(sorted(whole.items()))}

    def expect(delta, scale, gathered=False, only=None):
        for key, w in lora_base_weights(model).items():
            if only is not None and key not in only:
                continue
            want = whole[key] + scale * delta[key] if scale else whole[key]
            if key in experts and not gathered:
                want = ep.local_rows(want)
            assert torch.equal(w, want), (key, scale, gathered)
    twice = {k: 2 * v for k, v in deltas.items()}
    with ep.gathered(model):  # a first delta set inside, by rank 0 alone (evaluation)
        if rank == 0:
            set_base_delta(model, deltas)
            expect(deltas, 1, gathered=True)
    expect(deltas, 0, only=experts)  # the local experts were not touched inside
    set_base_delta(model, deltas)  # every rank, as each round does
    expect(deltas, 1)
    with ep.gathered(model):
        expect(deltas, 1, gathered=True)  # the merged weights, gathered
        if rank == 0:
            set_base_delta(model, twice)
            expect(deltas, 2, gathered=True)
    expect(deltas, 1, only=experts)  # the local experts were not touched inside (rank 0's
    # replicated attention weights were: the next round's set_base_delta resets them)
    set_base_delta(model, twice)
    expect(deltas, 2)
    set_base_delta(model, {})
    expect(deltas, 0)


def test_two_expert_parallel_ranks_match_one_process():
    from pipeline.engine.client import free_port

    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
    want = _reference(x)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, x, want, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {0: None, 1: None}
