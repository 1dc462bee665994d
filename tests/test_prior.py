"""The Prior: its three shapes, user groups, and group-prior evidence against dense maths."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.posterior import Prior
from tests import oracle

NAMES = ["a.weight", "a.bias", "b.weight", "b.bias"]
NUMEL = [6, 2, 4, 2]
GROUPS = [["a.weight", "b.weight"], ["a.bias", "b.bias"]]  # weights vs biases: not contiguous


def dense_delta(delta, groups=None):
    """δ per parameter (P,) by an explicit loop over tensors, independent of Prior."""
    if delta.ndim == 0:
        return delta.expand(sum(NUMEL))
    if delta.numel() == sum(NUMEL):
        return delta
    group_of = {n: i for i, n in enumerate(NAMES)} if groups is None else {
        n: g for g, members in enumerate(groups) for n in members
    }
    return torch.cat([delta[group_of[n]].expand(k) for n, k in zip(NAMES, NUMEL)])


@pytest.mark.parametrize(
    ("delta", "groups"),
    [
        (torch.tensor(0.7), None),
        (torch.tensor([0.5, 1.0, 2.0, 3.0]), None),
        (torch.tensor([0.5, 4.0]), GROUPS),
        (torch.rand(14) + 0.1, None),
        (torch.rand(14) + 0.1, GROUPS),
    ],
)
def test_prior_quantities_equal_explicit_diagonal_matrices(delta, groups):
    delta = delta.double()  # parameters are made at collection time, before the float64 fixture
    prior = Prior(delta, mean=0.1, groups=groups).bind(NAMES, NUMEL)
    full = dense_delta(delta, groups)
    theta = torch.randn(14)
    P0 = torch.diag(full)
    torch.testing.assert_close(prior.expand().expand(14), full, rtol=0, atol=0)
    torch.testing.assert_close(prior.log_det(), torch.linalg.slogdet(P0)[1], rtol=1e-12, atol=0)
    diff = theta - 0.1
    torch.testing.assert_close(prior.scatter(theta), diff @ P0 @ diff, rtol=1e-12, atol=0)
    expected = oracle.gaussian_log_density(theta, torch.full((14,), 0.1), torch.linalg.inv(P0))
    torch.testing.assert_close(prior.log_prob(theta), expected, rtol=1e-12, atol=1e-12)
    per_tensor = prior.per_tensor()
    torch.testing.assert_close(
        torch.cat([d.expand(k) for d, k in zip(per_tensor, NUMEL)]), full, rtol=0, atol=0
    )


def test_per_block_gives_one_value_inside_a_group_and_slices_across_groups():
    delta = torch.tensor([0.5, 4.0])
    prior = Prior(delta, groups=GROUPS).bind(NAMES, NUMEL)
    blocks = prior.per_block([0, 6, 8, 12, 14])  # one block per tensor
    assert [b.ndim for b in blocks] == [0, 0, 0, 0]
    assert [b.item() for b in blocks] == [0.5, 4.0, 0.5, 4.0]
    spanning = prior.per_block([0, 8, 14])  # a.weight + a.bias in one block: two groups
    torch.testing.assert_close(spanning[0], dense_delta(delta, GROUPS)[:8], rtol=0, atol=0)
    merged = Prior(delta, groups=[["a.weight", "a.bias"], ["b.weight", "b.bias"]])
    merged.bind(NAMES, NUMEL)
    assert merged.per_block([0, 8, 14])[0].ndim == 0  # one group: a single δ


def test_prior_rejects_bad_groups_and_shapes():
    with pytest.raises(ValueError, match="two prior groups"):
        Prior(1.0, groups=[["a.weight"], ["a.weight", "a.bias", "b.weight", "b.bias"]]).bind(
            NAMES, NUMEL
        )
    with pytest.raises(ValueError, match="in no group"):
        Prior(1.0, groups=[["a.weight", "a.bias"]]).bind(NAMES, NUMEL)
    with pytest.raises(ValueError, match="not in the posterior"):
        Prior(1.0, groups=[*GROUPS, ["c.weight"]]).bind(NAMES, NUMEL)
    with pytest.raises(ValueError, match="give a scalar, 2"):
        Prior(torch.ones(3), groups=GROUPS).bind(NAMES, NUMEL)
    with pytest.raises(ValueError, match="positive"):
        Prior(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="prior_mean"):
        Prior(1.0, mean=torch.zeros(3)).bind(NAMES, NUMEL)
    with pytest.raises(ValueError, match="prior_structure"):
        Prior(1.0).bind(NAMES, NUMEL).shape("blockwise")
    assert Prior(0.0, allow_zero=True).precision.item() == 0.0


def test_initial_values_for_each_structure():
    prior = Prior(torch.tensor([2.0, 8.0]), groups=GROUPS).bind(NAMES, NUMEL)
    assert prior.initial(prior.shape("scalar")).item() == pytest.approx(4.0)  # geometric mean
    torch.testing.assert_close(prior.initial(prior.shape("diagonal")), dense_delta(
        torch.tensor([2.0, 8.0]), GROUPS))
    torch.testing.assert_close(prior.initial((2,), torch.tensor(3.0)), torch.full((2,), 3.0))


# ---- a Laplace posterior with group priors ------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def fitted(structure, delta, groups=GROUPS, **kw):
    torch.manual_seed(1)
    model = Net()
    x, y = torch.randn(25, 3), torch.randint(0, 2, (25,))
    la = marglik.Laplace(model, "classification", hessian_structure=structure,
                         prior_precision=delta, prior_groups=groups, **kw)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=10)), model, x, y


def test_group_prior_evidence_equals_brute_force_full_ggn():
    delta = torch.tensor([0.3, 2.5])
    la, model, x, y = fitted("full", delta)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = oracle.ggn(model, x, y, oracle.categorical_nll)
    log_lik = -oracle.categorical_nll(model(x), y).detach()
    expected = oracle.laplace_evidence(log_lik, theta, H, dense_delta(delta, GROUPS))
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_group_prior_evidence_and_gradient_equal_dense_slogdet(structure):
    la, model, x, y = fitted(structure, torch.tensor([0.3, 2.5]))
    H = la.H.to_dense()
    theta = la.mean

    def dense(d):
        P0 = torch.diag(dense_delta(d, GROUPS))
        return (la.log_likelihood() - 0.5 * theta @ P0 @ theta
                - 0.5 * (torch.linalg.slogdet(H + P0)[1] - torch.linalg.slogdet(P0)[1]))

    d1 = torch.tensor([0.7, 1.9], requires_grad=True)
    d2 = d1.detach().clone().requires_grad_(True)
    ours, ref = la.log_marginal_likelihood(d1), dense(d2)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(d1.grad, d2.grad, rtol=1e-9, atol=1e-11)


def test_group_prior_optimisation_learns_one_value_per_group_and_round_trips(tmp_path):
    la, *_ = fitted("kron", 1.0)
    before = la.log_marginal_likelihood().item()
    history = la.optimize_prior_precision(prior_structure="layerwise", n_steps=60)
    assert la.prior_precision.shape == (2,)  # one per group, not one per tensor
    assert history["log_marglik"][-1] > before
    # at the optimum the gradient of the evidence w.r.t. log δ is close to zero
    log_delta = la.prior_precision.log().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(log_delta.exp()), log_delta)
    assert grad.abs().max() < 0.05
    path = tmp_path / "la.pt"
    torch.save(la.state_dict(), path)
    other = marglik.Laplace(la.model, "classification", prior_groups=GROUPS)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.prior.groups == GROUPS
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_group_prior_with_the_wrong_number_of_values_is_a_clear_error():
    with pytest.raises(ValueError, match="one per group"):
        marglik.Laplace(Net(), "classification", prior_precision=torch.ones(4),
                        prior_groups=GROUPS)
    with pytest.raises(ValueError, match="in no group"):
        marglik.Laplace(Net(), "classification", prior_groups=[["a.weight"]])


def test_layerwise_prior_is_the_default_grouping():
    la, *_ = fitted("kron", torch.tensor([0.5, 1.0, 2.0, 3.0]), groups=None)
    explicit, *_ = fitted("kron", torch.tensor([0.5, 1.0, 2.0, 3.0]),
                          groups=[[n] for n in NAMES])
    torch.testing.assert_close(la.log_marginal_likelihood(),
                               explicit.log_marginal_likelihood(), rtol=0, atol=0)
    assert math.isfinite(la.log_marginal_likelihood().item())


def test_online_training_learns_one_prior_precision_per_group():
    torch.manual_seed(2)
    model = Net()
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    seen = []

    def callback(epoch, model, la, history):
        seen.append(la.prior.groups)

    la, _, history = marglik.marglik_training(
        model, DataLoader(TensorDataset(x, y), batch_size=10), "classification",
        n_epochs=3, n_hypersteps=5, laplace_kwargs={"prior_groups": GROUPS}, callback=callback,
    )
    assert la.prior_precision.shape == (2,)
    assert all(len(p) == 2 for p in history["prior_precision"])
    assert seen == [GROUPS] * 3
    # 2 groups over 4 tensors reach the MAP objective expanded (a per-tensor reading would fail):
    # its prior term is δ_g Σ_{θ in g} θ² / (2N)
    delta = la.prior_precision
    params = dict(model.named_parameters())
    expected = sum(delta[g] * sum(params[n].detach().square().sum() for n in members)
                   for g, members in enumerate(GROUPS)) / (2 * 30)
    ours = marglik.training.prior_term(model, la.prior.expand(delta), 30).detach()
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)


def test_a_checked_precision_modified_in_place_is_checked_again():
    from marglik.posterior.prior import check_precision

    delta = torch.tensor([1.0, 2.0])
    assert check_precision(delta) is delta
    assert check_precision(delta) is delta  # same object, unchanged: not checked again
    delta.mul_(-1)
    with pytest.raises(ValueError, match="positive"):
        check_precision(delta)
    zero = torch.tensor(0.0)
    assert check_precision(zero, allow_zero=True) is zero
    with pytest.raises(ValueError, match="positive"):  # allowed with zeros is not enough
        check_precision(zero)


def test_groups_of_one_entry_each_read_delta_in_the_groups_order():
    """With P one-entry tensors in P user groups listed out of parameter order, δ is per group
    (the per-parameter reading would give each value to the wrong tensor)."""
    prior = Prior(torch.tensor([1.0, 2.0, 3.0]), groups=[["c"], ["a"], ["b"]]).bind(
        ["a", "b", "c"], [1, 1, 1])
    assert prior.kind() == "group"
    torch.testing.assert_close(prior.expand(), torch.tensor([2.0, 3.0, 1.0]), rtol=0, atol=0)
    assert [d.item() for d in prior.per_tensor()] == [2.0, 3.0, 1.0]
