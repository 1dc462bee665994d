"""The authors' neural estimator: closed-form gradients, batched = one-pair fits, replica."""

import math

import numpy as np
import pytest
import torch

from marglik.applications.causal.estimators import standardise
from marglik.applications.causal.estimators.reference import (
    ReferenceNeuralEstimator,
    cosine_lr,
    fit_reference_batch,
    reference_init,
    reference_nll_grads,
)


class Head(torch.nn.Module):
    """out1 = a f1, out2 = exp(b f2), b = 0 at the start (the authors' ``HetSpindlyHead``)."""

    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
        self.lin2 = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
        self.lin2.weight.data.fill_(0.0)

    def forward(self, f):
        return torch.cat([self.lin1(f[:, :1]), torch.exp(self.lin2(f[:, 1:]))], 1)


def replica(hidden: int, seed: int) -> torch.nn.Sequential:
    """The authors' network as an nn.Module, built after ``torch.manual_seed(seed)`` in float64."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(1, hidden, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 2, dtype=torch.float64),
        Head(),
    )


def replica_nll(net, x, y):
    """Mean NLL as ``causa/ml.py`` writes it: Normal(loc = −½ out1/η2, scale = √(−½/η2))."""
    out = net(x.reshape(-1, 1))
    eta2 = -0.5 * out[:, 1]
    dist = torch.distributions.Normal(-0.5 * out[:, 0] / eta2, torch.sqrt(-0.5 / eta2))
    return -dist.log_prob(y).mean()


def train_replica(x, y, steps, hidden=100, seed=711):
    """Autograd + torch Adam + CosineAnnealingLR, as ``map_optimization`` (min loss, network)."""
    with torch.random.fork_rng(devices=[]):
        net = replica(hidden, seed)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-6)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = replica_nll(net, x, y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return min(losses), net


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = np.sin(2 * x) + (0.2 + 0.3 * np.abs(x)) * rng.normal(size=n)
    return standardise(x), standardise(y)


def test_init_is_the_authors_network():
    with torch.random.fork_rng(devices=[]):
        net = replica(100, 711)
    W1, b1, W2, b2, head = reference_init(100, 711)
    torch.testing.assert_close(W1, net[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(b1[:, 0], net[0].bias, rtol=0, atol=0)
    torch.testing.assert_close(W2, net[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(b2[:, 0], net[2].bias, rtol=0, atol=0)
    assert head[0, 0] == net[3].lin1.weight[0, 0] and head[1, 0] == 0


def test_gradients_match_autograd_with_padding():
    torch.manual_seed(0)
    B, H, lengths = 3, 7, [40, 25, 33]
    n = max(lengths)
    shapes = [(B, H, 1), (B, H, 1), (B, 2, H), (B, 2, 1), (B, 2, 1)]
    params = [torch.randn(s, dtype=torch.float64) * 0.7 for s in shapes]
    X, Y = torch.randn(B, 1, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    M = torch.zeros(B, n, dtype=torch.float64)
    for b, m in enumerate(lengths):
        M[b, :m] = 1 / m
        X[b, 0, m:] = 5.0  # padding must not matter
    loss, grads = reference_nll_grads(params, X, Y, M)
    for b, m in enumerate(lengths):
        net = replica(H, 0)
        with torch.no_grad():
            net[0].weight.copy_(params[0][b])
            net[0].bias.copy_(params[1][b, :, 0])
            net[2].weight.copy_(params[2][b])
            net[2].bias.copy_(params[3][b, :, 0])
            net[3].lin1.weight.fill_(params[4][b, 0, 0].item())
            net[3].lin2.weight.fill_(params[4][b, 1, 0].item())
        ref = replica_nll(net, X[b, 0, :m], Y[b, :m])
        ref.backward()
        assert loss[b].item() == pytest.approx(ref.item(), rel=1e-12)
        ours = [grads[0][b], grads[1][b, :, 0], grads[2][b], grads[3][b, :, 0]]
        theirs = [net[0].weight.grad, net[0].bias.grad, net[2].weight.grad, net[2].bias.grad]
        for g, r in zip(ours, theirs, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
        head = torch.stack([net[3].lin1.weight.grad[0, 0], net[3].lin2.weight.grad[0, 0]])
        torch.testing.assert_close(grads[4][b, :, 0], head, rtol=1e-10, atol=1e-13)


def test_cosine_schedule_is_torchs():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50, eta_min=1e-6)
    for step in range(50):
        assert cosine_lr(step, 50, 1e-2, 1e-6) == pytest.approx(opt.param_groups[0]["lr"], 1e-12)
        opt.step()
        sched.step()


def test_training_matches_the_autograd_replica():
    x, y = data(120, 0)
    est = ReferenceNeuralEstimator(steps=150).fit(x, y)
    min_loss, net = train_replica(x, y, 150)
    assert est.min_loss_ == pytest.approx(min_loss, rel=1e-9)
    with torch.no_grad():
        out = net(torch.as_tensor(x).reshape(-1, 1))
    torch.testing.assert_close(est.outputs(x), out, rtol=1e-8, atol=1e-10)
    eta1, eta2 = est.natural_parameters(x)
    np.testing.assert_allclose(eta2, -0.5 * out[:, 1].numpy(), rtol=1e-8)
    assert math.isfinite(est.log_lik(x, y).mean())


@pytest.mark.parametrize(
    ("chunk", "dtype"),
    [(1, torch.float64), (3, torch.float64), (8, torch.float64), (3, torch.float32)],
)
def test_batched_fit_equals_one_pair_fits(chunk, dtype):
    pairs = [data(n, s) for s, n in enumerate([60, 90, 60, 75, 90])]
    pairs += [(y, x) for x, y in pairs[:2]]  # both directions of two pairs
    batch = [ReferenceNeuralEstimator(steps=100, chunk=chunk, compute_dtype=dtype) for _ in pairs]
    fit_reference_batch(batch, pairs)
    # float32 work: padding and batch size change float32 summation order (rounding ~1e-7)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    for est, (x, y) in zip(batch, pairs, strict=True):
        alone = ReferenceNeuralEstimator(steps=100, compute_dtype=dtype).fit(x, y)
        assert est.min_loss_ == pytest.approx(alone.min_loss_, rel=rel)
        np.testing.assert_allclose(est.log_lik(x, y), alone.log_lik(x, y), rtol=100 * rel)


def test_float32_work_stays_close_to_float64():
    """float32 hidden-layer work: the same fit up to float32 rounding, amplified by training."""
    x, y = data(200, 3)
    exact = ReferenceNeuralEstimator(steps=300).fit(x, y)
    fast = ReferenceNeuralEstimator(steps=300, compute_dtype=torch.float32).fit(x, y)
    assert fast.min_loss_ == pytest.approx(exact.min_loss_, abs=1e-4)
    np.testing.assert_allclose(fast.residuals(x, y), exact.residuals(x, y), atol=1e-2)
    assert fast.params_[0].dtype == torch.float64  # parameters stay float64


def test_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        ReferenceNeuralEstimator(steps=0)
    with pytest.raises(ValueError, match="lr_min"):
        ReferenceNeuralEstimator(lr=1e-3, lr_min=1e-2)
    with pytest.raises(ValueError, match="compute_dtype"):
        ReferenceNeuralEstimator(compute_dtype=torch.float16)
