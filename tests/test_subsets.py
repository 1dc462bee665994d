"""Subsets that mean what they say, odd-shaped parameters, and state dicts that refuse mismatches.

- the last layer is the last module other than the model itself that runs and owns parameters;
  parameters the top-level module owns are left out with a warning naming them, and a model
  whose parameters all sit in one module is refused rather than taken whole;
- 0-d and other odd-shaped parameters work in every structure (checked against brute force);
- ``"all"`` means the parameters with ``requires_grad=True`` (laplace-torch ≥ 0.2);
- ``load_state_dict`` refuses a state of another subset, last layer, subnetwork or size.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.subsets import find_last_layer, select_subset
from tests import oracle


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Scale(nn.Module):
    """A layer with an odd-shaped parameter (1, 2, 1)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, 2, 1))

    def forward(self, f):
        return f + self.shift.reshape(2)


class Tempered(nn.Module):
    """A network whose top-level module owns a learned 0-d temperature, used last."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.scale = Scale()
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.scale(self.body(x)) * self.t


class Flat(nn.Module):
    """Every parameter owned by one module (no layers)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 4))
        self.w2 = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return torch.tanh(x @ self.w1) @ self.w2


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Flat()

    def forward(self, x):
        return self.inner(x)


def classification_data(n=10):
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


# ---- the last layer -------------------------------------------------------------------------
def test_last_layer_leaves_out_a_root_owned_temperature_with_a_warning():
    model = Tempered()
    x, y = classification_data()
    with pytest.warns(UserWarning, match=r"\['t'\] belong to the model itself"):
        la = marglik.Laplace(model, "classification", "last_layer", "full").fit(loader(x, y))
    assert la.last_layer_name == "scale"
    assert la.subset.names == ["scale.shift"] and la.n_params == 2
    H = oracle.ggn(model, x, y, oracle.categorical_nll, names=["scale.shift"])
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)


def test_last_layer_is_the_last_module_that_runs_not_the_last_defined():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(4, 2)  # defined first, runs last
            self.hidden = nn.Linear(3, 4)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    x, _ = classification_data()
    assert find_last_layer(Reversed(), x) == "out"


@pytest.mark.parametrize("model", [Flat(), Wrapped(), nn.Linear(3, 2)])
def test_last_layer_that_would_be_the_whole_model_is_refused(model):
    x, y = classification_data()
    with pytest.raises(ValueError, match="whole model"):
        marglik.Laplace(model, "classification", "last_layer").fit(loader(x, y))
    # naming it is explicit, and allowed
    name = "inner" if isinstance(model, Wrapped) else ""
    la = marglik.Laplace(model, "classification", "last_layer", "diag", last_layer_name=name)
    la.fit(loader(x, y))
    assert la.n_params == sum(p.numel() for p in model.parameters())


def test_a_detected_last_layer_holds_only_its_own_parameters():
    class Head(nn.Module):  # owns a gain and holds a child layer; runs last
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 2)
            self.gain = nn.Parameter(torch.ones(2))

        def forward(self, h):
            return self.inner(h) * self.gain

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Head())
    x, _ = classification_data()
    assert find_last_layer(model, x) == "2"
    assert select_subset(model, "last_layer", example_input=x).names == ["2.gain"]
    named = select_subset(model, "last_layer", last_layer_name="2").names
    assert named == ["2.gain", "2.inner.weight", "2.inner.bias"]  # named_parameters() order


# ---- 0-d and odd-shaped parameters ------------------------------------------------------------
def fitted_all(structure, **kw):
    model = Tempered()
    x, y = classification_data(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KFAC: the 0-d and (1, 2, 1) tensors get diagonals
        la = marglik.Laplace(model, "classification", "all", structure, **kw).fit(loader(x, y))
    H = oracle.ggn(model, x, y, oracle.categorical_nll, names=la.subset.names)
    return model, x, la, H


def test_zero_d_and_odd_shaped_parameters_full_equals_brute_force():
    model, x, la, H = fitted_all("full")
    assert la.subset.names == ["t", "body.0.weight", "body.0.bias", "body.2.weight",
                               "body.2.bias", "scale.shift"]
    assert la.n_params == 1 + 12 + 4 + 8 + 2 + 2
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.mean[0], model.t.detach())
    # the GLM predictive through the 0-d parameter: J Σ Jᵀ with dense Jacobians
    J = oracle.jacobians(model, x[:4], names=la.subset.names)
    expected = J @ la.posterior_covariance @ J.transpose(1, 2)
    for backend in ("generic", "auto"):
        f, cov = la.functional_moments(x[:4], backend=backend)
        torch.testing.assert_close(cov, expected, rtol=1e-8, atol=1e-10)
    # samples put the 0-d parameter back in place
    samples = la.function_samples(x[:2], n_samples=3)
    assert samples.shape == (3, 2, 2)
    assert model.t.shape == () and torch.equal(model.t.detach(), la.mean[0])


def test_zero_d_and_odd_shaped_parameters_diag_equals_brute_force():
    _, _, la, H = fitted_all("diag")
    torch.testing.assert_close(la.H.diag(), H.diagonal(), rtol=1e-10, atol=1e-12)


def test_zero_d_and_odd_shaped_parameters_get_exact_diagonal_blocks_in_kron():
    _, x, la, H = fitted_all("kron")
    dense = la.H.to_dense()
    rest = [0, 27, 28]  # t and scale.shift in subset order
    torch.testing.assert_close(dense[rest][:, rest], torch.diag(H.diagonal()[rest]),
                               rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(dense[rest][:, 1:27]) == 0
    evidence = la.log_marginal_likelihood()
    expected = oracle.laplace_evidence(
        la.log_likelihood(), la.mean, dense, la.prior.expand(la.prior_precision)
    )
    torch.testing.assert_close(evidence, expected, rtol=1e-10, atol=1e-10)


def test_zero_d_and_odd_shaped_parameters_lowrank_equals_top_eigenpairs():
    _, _, la, H = fitted_all("lowrank", rank=5)
    torch.testing.assert_close(
        la.H.blocks[0].s, torch.linalg.eigvalsh(H).flip(0)[:5], rtol=1e-6, atol=1e-8
    )


# ---- "all" means the parameters that require grad -------------------------------------------
def test_all_means_the_parameters_that_require_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    x, y = classification_data()
    la = marglik.Laplace(model, "classification", "all", "full").fit(loader(x, y))
    assert la.subset.names == ["0.weight", "2.weight", "2.bias"] and la.n_params == 22
    H = oracle.ggn(model, x, y, oracle.categorical_nll, names=la.subset.names)
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
    assert select_subset(model, "all").names == select_subset(model, "requires_grad").names
    model.requires_grad_(False)  # nothing trainable: every parameter, not an empty posterior
    assert select_subset(model, "all").names == ["0.weight", "0.bias", "2.weight", "2.bias"]


# ---- state dicts refuse mismatches ------------------------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_an_all_weights_kfac_state_is_refused_by_a_last_layer_posterior():
    model = mlp()
    x, y = classification_data()
    state = marglik.Laplace(model, "classification", "all", "kron").fit(loader(x, y)).state_dict()
    with pytest.raises(ValueError, match="subset_of_weights='all'.*'last_layer'"):
        marglik.Laplace(model, "classification", "last_layer", "kron").load_state_dict(state)


def test_a_last_layer_state_loads_into_an_unfitted_last_layer_posterior_and_checks_its_name():
    model = mlp()
    x, y = classification_data()
    la = marglik.Laplace(model, "classification", "last_layer", "kron").fit(loader(x, y))
    state = la.state_dict()
    assert state["last_layer_name"] == "2" and state["subset_of_weights"] == "last_layer"
    new = marglik.Laplace(model, "classification", "last_layer", "kron").load_state_dict(state)
    assert new.last_layer_name == "2" and new.subset.names == ["2.weight", "2.bias"]
    torch.testing.assert_close(new.log_marginal_likelihood(), la.log_marginal_likelihood())
    with pytest.raises(ValueError, match="last layer '2'.*'0'"):
        marglik.Laplace(
            model, "classification", "last_layer", "kron", last_layer_name="0"
        ).load_state_dict(state)
    tampered = {**state, "last_layer_name": "0"}  # names no longer those of the saved layer
    with pytest.raises(ValueError, match=r"covers parameters \['2.weight', '2.bias'\]"):
        marglik.Laplace(model, "classification", "last_layer", "kron").load_state_dict(tampered)


def test_subnetwork_states_must_select_the_same_parameters_and_entries():
    model = mlp()
    x, y = classification_data()
    P = sum(p.numel() for p in model.parameters())
    idx = torch.arange(0, P, 3)
    la = marglik.Laplace(model, "classification", "subnetwork", "full", subnetwork=idx)
    state = la.fit(loader(x, y)).state_dict()
    same = marglik.Laplace(model, "classification", "subnetwork", "full", subnetwork=idx)
    torch.testing.assert_close(
        same.load_state_dict(state).log_marginal_likelihood(), la.log_marginal_likelihood()
    )
    with pytest.raises(ValueError, match="other entries of the subnetwork"):
        marglik.Laplace(
            model, "classification", "subnetwork", "full", subnetwork=idx + 1
        ).load_state_dict(state)
    by_name = marglik.Laplace(model, "classification", "subnetwork", "full", subnetwork=["2"])
    with pytest.raises(ValueError, match="covers parameters"):
        by_name.load_state_dict(state)


def test_states_of_another_size_or_of_older_releases():
    model = mlp()
    x, y = classification_data()
    la = marglik.Laplace(model, "classification", "all", "diag").fit(loader(x, y))
    state = la.state_dict()
    with pytest.raises(ValueError, match="the mean covers 25 parameters, its subset 26"):
        marglik.Laplace(model, "classification", "all", "diag").load_state_dict(
            {**state, "mean": state["mean"][:-1]}
        )
    old = {k: v for k, v in state.items() if k not in ("subset_of_weights", "last_layer_name")}
    new = marglik.Laplace(model, "classification", "all", "diag").load_state_dict(old)
    torch.testing.assert_close(new.log_marginal_likelihood(), la.log_marginal_likelihood())
    model[0].bias.requires_grad_(False)  # "all" now covers other parameters
    with pytest.raises(ValueError, match="covers parameters"):
        marglik.Laplace(model, "classification", "all", "diag").load_state_dict(state)
