"""The softmax predictive from C − 1 centred output columns (issue 19).

softmax(f) = softmax(P f), P = I − 11ᵀ/C, so the probit and Laplace-bridge links read only the
centred Gaussian N(Pμ, PΣP); its covariance needs the C − 1 columns Vᵀ J (V Vᵀ = P) instead of
all C. Checked against P J Σ Jᵀ P from dense Jacobians and the inverse of the explicit
precision (float64), on both backends, with and without a graph to x, and on the posteriors
that only project.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
import marglik.curvature.backprop as backprop
import marglik.posterior.layerwise as layerwise
from marglik.predictive.links import centre_covariance, probit, zero_sum_basis
from tests import oracle
from tests.test_resnet_scale import _fitted_tiny_resnet


def test_zero_sum_basis_is_orthonormal_and_spans_the_centred_logits():
    for C in (2, 3, 10):
        V = zero_sum_basis(C, torch.float64)
        P = torch.eye(C, dtype=torch.float64) - 1 / C
        torch.testing.assert_close(V @ V.mT, P, rtol=0, atol=1e-14)
        torch.testing.assert_close(V.mT @ V, torch.eye(C - 1, dtype=torch.float64),
                                   rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="two classes"):
        zero_sum_basis(1)


_fitted = _fitted_tiny_resnet  # tiny ResNet (BatchNorm in eval), fitted, layer-wise δ


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("backend", ["layerwise", "generic"])
def test_centred_chunks_equal_the_projected_brute_force(monkeypatch, structure, backend):
    la = _fitted(structure)
    xt = torch.randn(5, 2, 6, 6)
    columns = []
    original = backprop.backprop_columns
    monkeypatch.setattr(layerwise, "backprop_columns",
                        lambda f, t, U, **kw: columns.append(U.shape[0]) or original(f, t, U, **kw))
    chunks = list(la.functional_moment_chunks(xt, chunk_size=2, backend=backend, centred=True))
    cov = torch.cat([c for _, c in chunks])
    J = oracle.jacobians(la.model, xt, la.subset.names)
    Sigma = torch.linalg.inv(la.posterior_precision)
    expected = centre_covariance(J @ Sigma @ J.mT)
    torch.testing.assert_close(cov, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([f for f, _ in chunks]), la.model(xt))
    assert columns == ([2, 2, 2] if backend == "layerwise" else [])  # C − 1 = 2 columns
    # the plain moments stay uncentred
    _, full = la.functional_moments(xt, backend=backend)
    torch.testing.assert_close(full, J @ Sigma @ J.mT, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm"])
@pytest.mark.parametrize("backprop_to_x", [False, True])
def test_links_from_centred_columns_equal_those_from_the_full_covariance(link, backprop_to_x):
    from marglik.predictive import apply_link

    la = _fitted("kron")
    xt = torch.randn(4, 2, 6, 6, requires_grad=backprop_to_x)
    f, cov = la.functional_moments(xt.detach())
    expected = apply_link(f, cov, link, binary=False)
    probs = la(xt, link_approx=link, enable_backprop=backprop_to_x)
    torch.testing.assert_close(probs, expected, rtol=1e-10, atol=1e-12)
    if backprop_to_x:
        (grad,) = torch.autograd.grad(probs[:, 0].sum(), xt)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(probit(f, cov), apply_link(f, cov, "probit", binary=False))


def test_outputs_with_positions_and_other_posteriors_keep_or_project_their_covariance():
    """Outputs (B, S, C) are left uncentred (the links centre each position); a posterior that
    only has functional_moments (the interface's default) and the functional Laplace project."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.Unflatten(1, (2, 3)))
    x = torch.randn(6, 3)
    y = torch.randint(0, 3, (6, 2))
    la = marglik.Laplace(model, "classification", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    _, full = la.functional_moments(x[:3])
    _, cov = next(la.functional_moment_chunks(x[:3], centred=True))
    torch.testing.assert_close(cov, full, rtol=1e-12, atol=1e-12)

    flat = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    yc = torch.randint(0, 3, (6,))
    fl = marglik.FunctionalLaplace(flat, "classification", prior_precision=0.7).fit([(x, yc)])
    _, full = fl.functional_moments(x[:3])
    _, cov = next(fl.functional_moment_chunks(x[:3], centred=True))
    torch.testing.assert_close(cov, centre_covariance(full), rtol=1e-12, atol=1e-12)
    _, cov = next(marglik.posterior.base.Posterior.functional_moment_chunks(fl, x[:3],
                                                                           centred=True))
    torch.testing.assert_close(cov, centre_covariance(full), rtol=1e-12, atol=1e-12)
