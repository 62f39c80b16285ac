"""UB-SMoE and loss-free balancing rules against hand computations."""
import math

import pytest
import torch

from pipeline.algorithms import routing_math as rm


def test_phi_raw_signs_and_magnitudes_on_known_utilisation():
    # 4 experts, top-1: uniform target 0.25. Expert 0 overused, 3 unused.
    u = torch.tensor([0.55, 0.25, 0.2, 0.0])
    raw = rm.phi_raw(u, u_star=0.25, eps=1e-6)
    assert raw[0] < 0 and raw[1].abs() < 1e-5 and raw[2] > 0 and raw[3] > 0.999
    assert raw[0].item() == pytest.approx(math.tanh(0.25 / (0.55 + 1e-6) - 1), rel=1e-5)
    assert raw[2].item() == pytest.approx(math.tanh(0.25 / (0.2 + 1e-6) - 1), rel=1e-5)
    assert raw.abs().max() <= 1


def test_utilisation_and_target_weighted_by_samples():
    counts = torch.tensor([[[6.0, 2.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])  # [C=2, L=1, M=4]
    tokens = torch.tensor([4.0, 2.0])
    weights = torch.tensor([3.0, 1.0])
    u = rm.utilisation(counts, tokens, weights)
    direct = (0.75 * counts[0] / 4 + 0.25 * counts[1] / 2)
    torch.testing.assert_close(u, direct.double())
    assert rm.target_utilisation(torch.tensor([2, 4]), weights, 4) == pytest.approx((0.75 * 2 + 0.25 * 4) / 4)


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
    add = rm.pseudo_gradients(grads, indices, probs, rho_c=0.5)
    w0, w1 = 0.6 + 0.7, 0.5
    g_bar = (w0 * grads[0] + w1 * grads[1]) / (w0 + w1)
    pi = (probs * torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]])).sum(0) / 3
    assert torch.equal(add[0], torch.zeros(2)) and torch.equal(add[1], torch.zeros(2))
    torch.testing.assert_close(add[2], 0.5 * pi[2] * g_bar)
    torch.testing.assert_close(add[3], 0.5 * pi[3] * g_bar)
    torch.testing.assert_close(rm.pseudo_gradients(grads, indices, probs, rho_c=1.0), 2 * add)
    everyone = rm.pseudo_gradients(grads, indices, probs, 0.5, scope="all")
    torch.testing.assert_close(everyone[0], 0.5 * pi[0] * g_bar)


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
