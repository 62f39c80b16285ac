"""UB-SMoE and loss-free balancing rules against hand computations."""
import math
import threading

import pytest
import torch

from pipeline.algorithms import routing_math as rm


def _pseudo_gradients(grads, indices, probs, rho_c, scope="all"):
    """The factor-space pseudo-gradient of one process's batch."""
    return rm.pseudo_gradients_from(grads, rm.routing_statistics(indices, probs), rho_c, scope)


def test_phi_raw_signs_and_magnitudes_on_known_utilisation():
    # 4 experts, top-1: uniform target 0.25. Expert 0 overused, 3 unused.
    u = torch.tensor([0.55, 0.25, 0.2, 0.0])
    raw = rm.phi_raw(u, u_star=0.25, eps=1e-6)
    assert raw[0] < 0 and raw[1].abs() < 1e-5 and raw[2] > 0 and raw[3] > 0.999
    assert raw[0].item() == pytest.approx(math.tanh(0.25 / (0.55 + 1e-6) - 1), rel=1e-5)
    assert raw[2].item() == pytest.approx(math.tanh(0.25 / (0.2 + 1e-6) - 1), rel=1e-5)
    assert raw.abs().max() <= 1


def test_momentum_and_range_penalty():
    mean_c, raw = torch.tensor([0.5, -0.5]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(rm.momentum_phi(mean_c, raw, 0.9), torch.tensor([0.55, -0.35]))
    phi = torch.tensor([-1.5, 0.0, 1.2])
    assert rm.range_penalty(phi, -1, 1, 0.1).item() == pytest.approx(0.1 * (0.25 + 0.04))
    assert rm.range_penalty(torch.zeros(3), -1, 1, 0.1).item() == 0


def test_rho_grows_as_top_k_shrinks():
    assert rm.rho(2, 8) > rm.rho(6, 8) and rm.rho(2, 8) == 0.75
    assert rm.rho(2, 8, "inverse") == 4.0
    with pytest.raises(ValueError):
        rm.rho(2, 8, "nope")


def _routing():
    # 3 tokens, 4 experts, top-1; expert 3 is never chosen, expert 2 neither.
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.3, 0.5, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    indices = torch.tensor([[0], [1], [0]])
    grads = torch.zeros(4, 2)
    grads[0] = torch.tensor([1.0, 2.0])
    grads[1] = torch.tensor([3.0, -1.0])
    return grads, indices, probs


def test_pseudo_gradients_reach_inactive_experts_only_and_scale_with_rho():
    grads, indices, probs = _routing()
    add = _pseudo_gradients(grads, indices, probs, rho_c=0.5, scope="inactive")
    w0, w1 = 0.6 + 0.7, 0.5
    g_bar = (w0 * grads[0] + w1 * grads[1]) / (w0 + w1)
    pi = (probs * torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]])).sum(0) / 3
    assert torch.equal(add[0], torch.zeros(2)) and torch.equal(add[1], torch.zeros(2))
    torch.testing.assert_close(add[2], 0.5 * pi[2] * g_bar)
    torch.testing.assert_close(add[3], 0.5 * pi[3] * g_bar)
    torch.testing.assert_close(_pseudo_gradients(grads, indices, probs, rho_c=1.0, scope="inactive"), 2 * add)
    everyone = _pseudo_gradients(grads, indices, probs, 0.5, scope="all")
    torch.testing.assert_close(everyone[0], 0.5 * pi[0] * g_bar)


class _ThreadGroup:
    """Sum-all-reduce over `size` threads standing for ranks, as torch.distributed would do."""

    def __init__(self, size):
        self.slots = [None] * size
        self.barrier = threading.Barrier(size)

    def sum_for(self, rank):
        def total(t):
            self.slots[rank] = t
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0].clone())  # same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them
            return out
        return total


def _on_ranks(size, fn):
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def _whole_batch():
    """12 tokens, 8 experts, top-2: tokens 0-5 use experts 0-2 only, tokens 6-11 experts 3-5
    only, nobody 6-7; so a shard alone would take experts its tokens skipped for inactive."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 8, generator=g)
    logits[:6, :3] += 6.0
    logits[6:, 3:6] += 6.0
    probs = logits.softmax(-1)
    indices = probs.topk(2, -1).indices
    assert set(indices[:6].unique().tolist()) <= {0, 1, 2} and set(indices[6:].unique().tolist()) <= {3, 4, 5}
    return probs, indices, torch.randn(8, 3, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scope", ["inactive", "all"])
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_group_summed_pseudo_gradients_over_two_shards_equal_the_whole_batch(scope, expert_parallel):
    """Two ranks, each with half of the tokens; under expert parallelism also half of the
    experts. Each rank's gradient carries the factor 2 of its loss (data_parallel.py) and the
    group averages them (DeepSpeed): the result is the whole batch's gradient plus its PG."""
    probs, indices, grad = _whole_batch()
    want = grad + _pseudo_gradients(grad, indices, probs, 0.75, scope)
    assert (want != grad).any()
    share = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=grad.dtype)
    group, experts = _ThreadGroup(2), _ThreadGroup(2)

    def rank(r):
        rows = slice(6 * r, 6 * r + 6)
        stats = rm.routing_statistics(indices[rows], probs[rows]).summed(group.sum_for(r))
        if expert_parallel:  # its experts' gradient already sums both ranks' tokens
            local = 2 * grad[4 * r:4 * r + 4]
            add = rm.pseudo_gradients_from(local, stats, 0.75, scope, first_expert=4 * r,
                                           sum_experts=experts.sum_for(r))
        else:  # all experts, the gradient of its own tokens only
            local = 2 * (share if r == 0 else grad - share)
            add = rm.pseudo_gradients_from(local, stats, 0.75, scope)
        return local + add
    got = _on_ranks(2, rank)
    got = torch.cat(got) / 2 if expert_parallel else (got[0] + got[1]) / 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pseudo_gradients_from_shard_statistics_alone_would_differ():
    """The test above is not vacuous: one shard's own statistics give another add."""
    probs, indices, grad = _whole_batch()
    whole = _pseudo_gradients(grad, indices, probs, 0.75, "inactive")
    alone = _pseudo_gradients(grad, indices[:6], probs[:6], 0.75, "inactive")
    assert not torch.allclose(alone, whole)


def test_loss_free_bias_evens_out_load_on_a_skewed_router():
    torch.manual_seed(0)
    n_tokens, m, k = 512, 8, 2
    skew = torch.linspace(2.0, -2.0, m)  # the router prefers low-index experts
    scores = torch.softmax(torch.randn(n_tokens, m) + skew, -1)
    bias = torch.zeros(m)

    def load(b):
        idx = (scores + b).topk(k, -1).indices
        return torch.bincount(idx.flatten(), minlength=m).double()

    before = load(bias)
    for _ in range(200):
        bias = rm.loss_free_bias_update(bias, load(bias), rate=1e-3)
    after = load(bias)
    cv = lambda x: (x.std() / x.mean()).item()  # noqa: E731
    assert cv(after) < 0.25 * cv(before)
