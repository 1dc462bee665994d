"""The per-layer contraction of the layer-wise GLM predictive (issue 19), each path against
brute force.

``_weight_quad`` has three ways to Σ_ij K_ij J̃_{c,ij} J̃_{c',ij}, J̃_c = Q_Gᵀ (Σ_r g_{c,r} a_rᵀ) Q_A:
rotating the inputs first, rotating the formed Jacobians, and the position-pair form (no
Jacobians). The choice is a cost model; every path must give the same numbers, so each is forced
here, on random tensors (against an explicit einsum) and on a small ResNet with BatchNorm in eval
mode and a residual block (against dense Jacobians and the inverse of the explicit precision).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import marglik
import marglik.posterior.layerwise_covariance as covariance
from marglik.posterior.layerwise import LayerData
from tests import oracle
from tests.test_resnet_scale import _fitted_tiny_resnet, tiny_resnet

PATHS = {  # name -> (pairs_first, rotate_inputs_first, rotate_gradients_first)
    "pairs": (True, True, True),
    "rotate-inputs": (False, True, True),
    "rotate-jacobians": (False, False, True),
    "rotate-jacobians-both-sides": (False, False, False),
    "rotate-inputs-and-jacobian-rows": (False, True, False),
}


def _force(monkeypatch, path: str) -> None:
    pairs, inputs_first, gradients_first = PATHS[path]
    monkeypatch.setattr(covariance, "pairs_first", lambda D, R: pairs)
    monkeypatch.setattr(covariance, "rotate_inputs_first", lambda D, R, m, n: inputs_first)
    monkeypatch.setattr(covariance, "rotate_gradients_first", lambda R, n: gradients_first)


def _orthogonal(k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(k, k, generator=gen))[0]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("R", [1, 3, 7])
@pytest.mark.parametrize("rotated", [True, False])
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("block", [None, 30])
def test_weight_quad_equals_explicit_jacobians(monkeypatch, path, R, rotated, negative, block):
    _force(monkeypatch, path)
    if block is not None:  # several blocks of weight rows / position pairs
        monkeypatch.setattr(covariance, "MAX_JACOBIAN_BLOCK", block)
    gen = torch.Generator().manual_seed(R)
    D, N, m, n = 4, 3, 5, 6
    a = torch.randn(N, R, n, generator=gen, dtype=torch.float64)
    g = torch.randn(D, N, R, m, generator=gen, dtype=torch.float64)
    K = torch.rand(m, n, generator=gen, dtype=torch.float64) + 0.1
    if negative:  # not from a positive prior: the path without √K
        K[0, 1] = -0.3
    QG, QA = (_orthogonal(m, gen), _orthogonal(n, gen)) if rotated else (None, None)
    J = torch.einsum("dnri,nrj->ndij", g, a)
    if rotated:
        J = QG.T @ J @ QA
    expected = torch.einsum("ndij,neij,ij->nde", J, J, K)
    got = covariance._weight_quad(LayerData(a, g), K, QG, QA)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_cost_model_picks_each_path_for_a_resnet18():
    """C = 10: the 4×4 layers take the pair form, the 32×32 layers rotate their Jacobians,
    the layers between rotate their inputs; 1×1 convolutions at high resolution rotate the
    Jacobians' rows too."""
    assert covariance.pairs_first(10, 16) and not covariance.pairs_first(10, 64)
    assert not covariance.rotate_inputs_first(10, 1024, 64, 576)
    assert covariance.rotate_inputs_first(10, 256, 128, 1152)
    assert covariance.rotate_gradients_first(256, 1152)
    assert not covariance.rotate_gradients_first(1024, 64)


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("path", list(PATHS))
def test_resnet_predictive_on_every_path_equals_brute_force(monkeypatch, structure, path):
    """J Σ Jᵀ of a conv net with BatchNorm in eval mode and a residual block, layer-wise, with
    the contraction forced onto one path, against dense Jacobians and the inverse of P."""
    _force(monkeypatch, path)
    la = _fitted_tiny_resnet(structure)
    xt = torch.randn(5, 2, 6, 6)
    _, cov = la.functional_moments(xt, chunk_size=3, backend="layerwise")
    J = oracle.jacobians(la.model, xt, la.subset.names)
    Sigma = torch.linalg.inv(la.posterior_precision)
    torch.testing.assert_close(cov, J @ Sigma @ J.mT, rtol=1e-9, atol=1e-12)


def test_layerwise_chunks_follow_their_own_bound(monkeypatch):
    """The default chunk of the layer-wise path holds about LAYERWISE_MAX_ELEMENTS numbers."""
    import marglik.posterior.glm as glm
    from marglik.posterior.layerwise import per_sample_footprint

    model = tiny_resnet()
    x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 3, (7,))
    la = marglik.Laplace(model, "classification", hessian_structure="kron")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    plan = glm.resolve_backend(la)
    per_input, D = per_sample_footprint(la, plan, x[:1])
    assert D == 3 and per_input > 0
    monkeypatch.setattr(glm, "LAYERWISE_MAX_ELEMENTS", 2 * per_input + 1)
    assert glm.chunk_length(la, x, plan, None) == 2
    assert glm.chunk_length(la, x, plan, 5) == 5
    monkeypatch.setattr(glm, "LAYERWISE_MAX_ELEMENTS", 1)
    assert glm.chunk_length(la, x, plan, None) == 1
