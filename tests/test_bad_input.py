"""Bad input raises a clear ValueError/RuntimeError naming the problem, never a silent number."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.likelihoods import Custom


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=5)


def mlp(out=3):
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, out))


X, Y = torch.randn(10, 2), torch.randint(0, 3, (10,))


@pytest.mark.parametrize(
    ("likelihood", "x", "y", "error", "message"),
    [
        ("classification", X, torch.randint(0, 3, (10, 2)), ValueError, "do not match"),
        ("regression", X, torch.randn(10, 2), ValueError, "do not match"),
        ("classification", X, torch.full((10,), 5), ValueError, "must lie in"),
        ("classification", torch.full((10, 2), float("nan")), Y, ValueError, "NaN"),
        ("regression", X, torch.full((10, 3), float("inf")), ValueError, "NaN"),
    ],
)
def test_bad_data_raises(likelihood, x, y, error, message):
    for structure in ("kron", "full", "diag"):
        with pytest.raises(error, match=message):
            marglik.Laplace(mlp(), likelihood, hessian_structure=structure).fit(loader(x, y))


def test_empty_loader_raises():
    with pytest.raises(ValueError, match="empty"):
        marglik.Laplace(mlp(), "classification").fit([])
    with pytest.raises(ValueError, match="empty"):
        marglik.Laplace(mlp(), "classification", "last_layer").fit([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_equals_isfinite(dtype):
    """The one-reduction check (a finite sum) against torch.isfinite, including sums that
    overflow (finite entries: True) and NaN / ±inf entries that cancel in no sum."""
    from marglik.curvature.batches import all_finite

    big = torch.finfo(dtype).max
    cases = [torch.zeros(0), torch.randn(5, 7), torch.full((4,), big), -torch.full((3, 2), big),
             torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 2.0]),
             torch.tensor([float("inf"), -float("inf")]), torch.tensor([-float("inf")]),
             torch.tensor([big, big, float("nan")]), torch.randn(3, 3).requires_grad_()]
    for t in cases:
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_non_finite_curvature_raises():
    class SqrtSquare(nn.Module):  # finite outputs, NaN gradient at 0
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)
            nn.init.zeros_(self.lin.weight)
            nn.init.zeros_(self.lin.bias)

        def forward(self, x):
            return torch.sqrt(self.lin(x) ** 2)

    for structure in ("full", "diag", "kron"):
        with pytest.raises(RuntimeError, match="NaN"):
            marglik.Laplace(SqrtSquare(), "regression", hessian_structure=structure).fit(
                loader(X, torch.randn(10, 1))
            )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prior_precision": 0.0}, "positive"),
        ({"prior_precision": -1.0}, "positive"),
        ({"prior_precision": torch.ones(5)}, "one per parameter tensor"),
        ({"prior_precision": torch.ones(2, 2)}, "scalar or a vector"),
        ({"temperature": 0.0}, "temperature"),
        ({"hessian_structure": "block"}, "hessian_structure"),
        ({"curvature": "hessian"}, "curvature"),
        ({"kfac_approx": "mean"}, "kfac_approx"),
        ({"subset_of_weights": "first_layer"}, "subset_of_weights"),
        ({"subset_of_weights": "subnetwork"}, "needs subnetwork"),
        ({"subset_of_weights": "subnetwork", "subnetwork": ["nope"]}, "no module named"),
        ({"subset_of_weights": "subnetwork", "subnetwork": torch.tensor([100])}, "indices"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        marglik.Laplace(mlp(), "classification", **kwargs).fit(loader(X, Y))


def test_regression_only_settings_raise_for_classification():
    with pytest.raises(ValueError, match="sigma_noise only applies"):
        marglik.Laplace(mlp(), "classification", sigma_noise=0.5)
    la = marglik.Laplace(mlp(), "classification").fit(loader(X, Y))
    with pytest.raises(ValueError, match="sigma_noise only applies"):
        la.log_marginal_likelihood(sigma_noise=torch.tensor(0.5))
    with pytest.raises(ValueError, match="tune_sigma"):
        la.optimize_prior_precision(tune_sigma=True)
    with pytest.raises(ValueError, match="sigma_noise"):
        marglik.Laplace(mlp(1), "regression", sigma_noise=0.0)
    reg = marglik.Laplace(mlp(1), "regression").fit(loader(X, torch.randn(10, 1)))
    with pytest.raises(ValueError, match="sigma_noise"):
        reg.log_marginal_likelihood(sigma_noise=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="positive"):
        reg.log_marginal_likelihood(prior_precision=torch.tensor(0.0))


def test_using_an_unfitted_posterior_raises():
    la = marglik.Laplace(mlp(), "classification")
    for use in (
        la.log_marginal_likelihood,
        la.sample,
        la.state_dict,
        lambda: la(X),
        lambda: la.optimize_prior_precision(),
        lambda: la.posterior_precision,
    ):
        with pytest.raises(RuntimeError, match="not fitted"):
            use()


def test_per_parameter_prior_with_kfac_raises_and_mc_needs_sampling():
    la = marglik.Laplace(mlp(), "classification", "all", "kron").fit(loader(X, Y))
    with pytest.raises(ValueError, match="per-parameter"):
        la.log_marginal_likelihood(prior_precision=torch.rand(la.n_params) + 0.5)
    custom = Custom(lambda f, y: -((f - y) ** 2).sum(-1))
    with pytest.raises(RuntimeError, match="cannot sample"):
        marglik.Laplace(mlp(1), custom, curvature="ggn-mc").fit(loader(X, torch.randn(10, 1)))


def test_bad_loader_items_and_theta_shapes_raise():
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        marglik.Laplace(mlp(), "classification").fit([X])
    la = marglik.Laplace(mlp(), "classification", hessian_structure="diag").fit(loader(X, Y))
    with pytest.raises(ValueError, match="entries"):
        la.log_prob(torch.zeros(3))


def test_laplace_checks_the_model_and_temperature():
    """The set-up shared with FunctionalLaplace (Posterior._init_model)."""
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        marglik.Laplace(lambda x: x, "classification")
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            marglik.Laplace(nn.Linear(2, 2), "classification", temperature=bad)
