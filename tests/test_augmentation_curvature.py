"""Curvature and evidence of the augmented model f(x) = 1/S Σ_s g(T_s x) (LILA, NeurIPS 2022).

Float64 brute force (tests/oracle.py: dense torch.func Jacobians of the averaged model, explicit
GGN sums and inverses): full and diagonal GGNs exact, KFAC-reduce over the copies exact for deep
linear networks (the average is a reduction before the loss), KFAC-expand exact where the copies
coincide; η = 0 gives the plain network's evidence; the η-gradient of the evidence through the
differentiable refit equals central finite differences of refits.
"""

import warnings

import pytest
import torch
from torch import nn

import marglik
from marglik.layers import AffineAugmentation, AugmentedModel, fixed_nodes
from tests import oracle

SUBSET = {"subset_of_weights": "subnetwork", "subnetwork": ["net"]}


def loader(x, y, batch_size=4):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class MeanOverPixels(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 3))


def deep_linear(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(25, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Conv2d(3, 2, 1), MeanOverPixels(),
                         nn.Linear(2, 2))


def augmented(net, eta=(0.6, 0.2, 0.3), generators=("rotate", "translate_x", "shear"), S=3):
    """In eval mode: the fixed copies, which the brute-force oracle needs (fits use eval mode
    anyway)."""
    return AugmentedModel(net, AffineAugmentation(generators, list(eta)), S).eval()


def data(task, n=6, classes=3):
    x = torch.randn(n, 1, 5, 5)
    y = torch.randint(0, classes, (n,)) if task == "classification" else torch.randn(n, classes)
    return x, y


NLL = {"classification": oracle.categorical_nll, "regression": oracle.gaussian_nll(1.0)}


def fit(model, task, x, y, structure, approx="expand", create_graph=False, subset=SUBSET, **kw):
    la = marglik.Laplace(model, task, hessian_structure=structure, kfac_approx=approx,
                         **subset, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer recorded, none dropped to a fallback
        return la.fit(loader(x, y), create_graph=create_graph)


def net_names(model, prefix="net."):
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_full_and_diagonal_ggn_of_the_averaged_model_are_exact(task, create_graph):
    model = augmented(cnn())
    x, y = data(task)
    H = oracle.ggn(model, x, y, NLL[task], net_names(model))
    full = fit(model, task, x, y, "full", create_graph=create_graph).H.to_dense()
    diag = fit(model, task, x, y, "diag", create_graph=create_graph).H.to_dense()
    torch.testing.assert_close(full.detach(), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.detach(), torch.diag(H.diagonal()), rtol=1e-10, atol=1e-12)


def kfac_errors(model, x, y, approx, subset=SUBSET):
    H = oracle.ggn(model, x, y, NLL["regression"], net_names(model, subset["subnetwork"][0] + "."))
    la = fit(model, "regression", x, y, "kron", approx, subset=subset)
    errors, offset = [], 0
    for block in la.H.blocks:
        exact = H[offset : offset + block.size, offset : offset + block.size]
        errors.append(((block.to_dense() - exact).norm() / exact.norm()).item())
        offset += block.size
    return errors


@pytest.mark.parametrize("kind", ["mlp", "conv-mean"])
def test_kfac_reduce_over_the_copies_is_exact_for_deep_linear_networks(kind):
    """The average over copies is a reduction before the loss: KFAC-reduce's setting."""
    x, y = data("regression", classes=2)
    model = augmented(deep_linear(kind))
    assert max(kfac_errors(model, x, y, "reduce")) < 1e-12
    assert max(kfac_errors(model, x, y, "expand")) > 1e-2  # expand drops the cross terms


def test_kfac_expand_over_coinciding_copies_is_the_plain_networks_kfac():
    """η = 0: the S copies coincide, and expand's factor S makes it the plain KFAC (exact for a
    deep linear MLP)."""
    x, y = data("regression", classes=2)
    net = deep_linear("mlp")
    model = augmented(net, eta=(0.0, 0.0, 0.0), S=4)
    assert max(kfac_errors(model, x, y, "expand")) < 1e-12
    for approx in ("expand", "reduce"):
        plain = marglik.Laplace(net, "regression", hessian_structure="kron", kfac_approx=approx)
        plain.fit(loader(x, y))
        mine = fit(model, "regression", x, y, "kron", approx)
        torch.testing.assert_close(mine.H.to_dense(), plain.H.to_dense(), rtol=1e-12,
                                   atol=1e-13)


@pytest.mark.parametrize("structure", ["kron", "full", "diag"])
def test_zero_extent_reproduces_the_plain_evidence(structure):
    x, y = data("classification")
    net = cnn()
    plain = marglik.Laplace(net, "classification", hessian_structure=structure,
                            prior_precision=0.7).fit(loader(x, y))
    expected = plain.log_marginal_likelihood()
    one = fit(augmented(net, eta=(0.0, 0.0, 0.0), S=1), "classification", x, y, structure,
              prior_precision=0.7)
    assert torch.equal(one.log_marginal_likelihood(), expected)  # S = 1: bit for bit
    three = fit(augmented(net, eta=(0.0, 0.0, 0.0), S=3), "classification", x, y, structure,
                prior_precision=0.7)
    torch.testing.assert_close(three.log_marginal_likelihood(), expected, rtol=1e-12, atol=0)


def evidence(model, x, y, structure, approx, create_graph):
    la = marglik.Laplace(model, "classification", hessian_structure=structure,
                         kfac_approx=approx, prior_precision=0.5, **SUBSET)
    return la.fit(loader(x, y), create_graph=create_graph).log_marginal_likelihood()


@pytest.mark.parametrize(("structure", "approx"),
                         [("full", "expand"), ("diag", "expand"), ("kron", "expand"),
                          ("kron", "reduce")])
def test_eta_gradient_of_the_evidence_matches_finite_differences_of_refits(structure, approx):
    torch.manual_seed(1)
    model = augmented(cnn(), eta=(0.4, 0.15), generators=("rotate", "scale_x"), S=3)
    x, y = data("classification")
    eta = model.augmentation.eta
    evidence(model, x, y, structure, approx, True).backward()
    grad = eta.grad.clone()
    h, fd = 1e-5, []
    with torch.no_grad():
        for j in range(len(eta)):
            start = eta.clone()
            eta[j] += h
            plus = evidence(model, x, y, structure, approx, False)
            eta[j] -= 2 * h
            minus = evidence(model, x, y, structure, approx, False)
            eta.copy_(start)
            fd.append((plus - minus) / (2 * h))
    torch.testing.assert_close(grad, torch.stack(fd), rtol=1e-6, atol=1e-8)
    assert grad.abs().min() > 1e-3  # the check is not vacuous


def test_layerwise_predictive_of_the_averaged_model_is_exact_for_its_kfac():
    x, y = data("classification")
    model = augmented(cnn())
    la = fit(model, "classification", x, y, "kron", prior_precision=0.8)
    xt = torch.randn(3, 1, 5, 5)
    J = oracle.jacobians(model, xt, net_names(model))
    P = la.H.to_dense() + 0.8 * torch.eye(J.shape[-1])
    expected = J @ torch.linalg.inv(P) @ J.transpose(1, 2)
    for backend in ("layerwise", "generic"):
        f, cov = la.functional_moments(xt, backend=backend)
        torch.testing.assert_close(cov, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f, model(xt), rtol=1e-12, atol=1e-12)


class AdditiveDirections(nn.Module):
    """A generic differentiable augmentation of vectors: x_s = x + η ⊙ d_s with fixed
    directions d_s (the R_k nodes), η learnable."""

    def __init__(self, dim: int):
        super().__init__()
        self.eta = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x, n_samples):
        d = fixed_nodes(n_samples, x.shape[1], 0, x.dtype, x.device)
        return x[:, None] + self.eta * d


def test_a_generic_augmentation_plugs_in_with_exact_curvature_and_gradient():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # deep linear: reduce exact
    model = AugmentedModel(net, AdditiveDirections(3), 5)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    H = oracle.ggn(model, x, y, NLL["regression"], net_names(model))
    la = fit(model, "regression", x, y, "full")
    torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
    la = fit(model, "regression", x, y, "kron", "reduce")
    torch.testing.assert_close(la.H.to_dense(), torch.block_diag(*[
        H[a:b, a:b] for a, b in [(0, 12), (12, 16), (16, 24), (24, 26)]]), rtol=1e-10,
        atol=1e-12)
    eta = model.augmentation.eta
    la = marglik.Laplace(model, "regression", hessian_structure="kron", **SUBSET)
    la.fit(loader(x, y), create_graph=True).log_marginal_likelihood().backward()
    h, fd = 1e-5, []
    with torch.no_grad():
        for j in range(3):
            values = []
            for step in (h, -h):
                eta[j] += step
                values.append(marglik.Laplace(model, "regression", hessian_structure="kron",
                                              **SUBSET).fit(loader(x, y))
                              .log_marginal_likelihood())
                eta[j] -= step
            fd.append((values[0] - values[1]) / (2 * h))
    torch.testing.assert_close(eta.grad, torch.stack(fd), rtol=1e-6, atol=1e-8)


def test_fit_leaves_the_augmented_model_as_it_was():
    model = augmented(cnn())
    model.train()
    x, y = data("classification")
    fit(model, "classification", x, y, "kron", create_graph=True)
    assert model.training and model.augmentation.training and model.augmentation.mode == "auto"
    assert model.augmentation.eta.requires_grad
    assert all(p.requires_grad for p in model.parameters())


def test_marglik_training_learns_eta_by_the_evidence():
    torch.manual_seed(0)
    model = augmented(cnn(), eta=(0.1,), generators=("rotate",), S=2)
    x, y = data("classification", n=8)
    la, model, history = marglik.marglik_training(
        model, loader(x, y), "classification", hessian_structure="kron", n_epochs=2,
        n_hypersteps=1, hyperparameters=model.hyperparameters(), lr=1e-2,
    )
    assert len(history["hyperparameters"]) == 2
    steps = [h[0][0] for h in history["hyperparameters"]]
    assert steps[0] != 0.1 and all(torch.isfinite(torch.tensor(steps)))
    assert la.n_params == sum(p.numel() for p in model.net.parameters())


def test_nested_copy_averaging_multiplies_the_copies():
    """An augmented model inside an augmented model: its layers see N·S1·S2 rows."""
    inner = AugmentedModel(deep_linear("mlp"), AffineAugmentation(("rotate",), [0.5]), 2)
    model = AugmentedModel(inner, AffineAugmentation(("translate_y",), [0.3]), 3).eval()
    x, y = data("regression", classes=2)
    subset = {"subset_of_weights": "subnetwork", "subnetwork": ["net.net"]}  # not inner η
    H = oracle.ggn(model, x, y, NLL["regression"], net_names(model, "net.net."))
    la = fit(model, "regression", x, y, "diag", subset=subset)
    torch.testing.assert_close(la.H.to_dense(), torch.diag(H.diagonal()), rtol=1e-10,
                               atol=1e-12)
    assert max(kfac_errors(model, x, y, "reduce", subset)) < 1e-12


def test_a_bad_copies_declaration_is_a_clear_error():
    class Bad(nn.Module):
        copies_per_input = 0

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            return self.lin(x)

    x, y = torch.randn(4, 2), torch.randn(4, 1)
    with pytest.raises(ValueError, match="copies_per_input must be a positive int"):
        marglik.Laplace(Bad(), "regression").fit(loader(x, y))
