"""LA-NAM's Kronecker-factored curvature (``hessian_structure="kron"``, the additive model's
default): :class:`BlockLinear` registered as a composite layer gives one Kronecker block per
subnetwork and layer. Checked in float64 against the exact GGN from dense ``torch.func``
Jacobians (one data point, where KFAC is exact per block) and against the same additive model
written as separate ``nn.Linear`` subnetworks (many data points)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from marglik import Laplace
from marglik.applications.additive import AdditiveNet, fit_additive
from marglik.structures import Kronecker
from tests.test_additive import D, _data, _delta_per_parameter, _dense_jacobian, _loader

torch.set_num_threads(1)
HIDDEN = (4, 3)


def _model(pairs=((0, 2),)) -> AdditiveNet:
    torch.manual_seed(0)
    model = AdditiveNet(D, HIDDEN, 1, pairs, "tanh").double()
    with torch.no_grad():
        model.bias.normal_()
    return model


def _kron(model, X, y, sigma=0.7):
    delta = torch.linspace(0.5, 3.0, model.n_groups + 1, dtype=torch.float64)
    la = Laplace(model, "regression", hessian_structure="kron", sigma_noise=sigma,
                 prior_precision=delta, prior_groups=model.prior_groups())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "KFAC cannot express")  # the output bias b (C,)
        la.fit(_loader(X, y))
    return la, delta


def test_kron_has_one_kronecker_block_per_subnetwork_and_layer():
    model = _model()
    X, y = _data()
    la, _ = _kron(model, X, y)
    kron = [b for b in la.H.blocks if isinstance(b, Kronecker)]
    assert len(kron) == len(HIDDEN + (1,)) * model.n_groups  # (D + K) · layers weight blocks
    assert sum(b.size for b in la.H.blocks) == sum(p.numel() for p in model.parameters())


def test_kron_equals_exact_ggn_blocks_on_one_point():
    """With one input and one output, G ⊗ A = vec(b aᵀ) vec(b aᵀ)ᵀ is the exact GGN block of
    each weight tensor (and b bᵀ that of each bias): the posterior precision is the exact GGN
    restricted to blocks of one parameter tensor, plus the prior per subnetwork."""
    model = _model()
    X, y = _data(1)
    sigma = 0.7
    la, delta = _kron(model, X, y, sigma)
    J = _dense_jacobian(model, lambda p: functional_call(model, p, (X,)))  # (1, 1, P)
    H = torch.einsum("ncp,ncq->pq", J, J) / sigma**2
    tensor_of = torch.cat([torch.full((p.numel(),), i) for i, p in
                           enumerate(model.parameters())])
    same = tensor_of[:, None] == tensor_of[None, :]
    expected = H * same + torch.diag(_delta_per_parameter(model, delta))
    torch.testing.assert_close(la.posterior_precision, expected, rtol=1e-10, atol=1e-10)


class _SeparateSubnetworks(nn.Module):
    """The additive model with one ``nn.Sequential`` of ``nn.Linear`` per subnetwork (a Python
    loop: the reference, not the library's batched network)."""

    def __init__(self, model: AdditiveNet):
        super().__init__()
        self.inputs = [[d] for d in range(model.n_features)] + [list(p) for p in model.pairs]
        blocks = [(model.features, g) for g in range(model.n_features)]
        blocks += [(model.interactions, k) for k in range(len(model.pairs))]
        self.nets = nn.ModuleList()
        for block, g in blocks:
            layers = []
            for i, layer in enumerate(block.layers):
                lin = nn.Linear(layer.in_features, layer.out_features).double()
                with torch.no_grad():
                    lin.weight.copy_(layer.weight[g])
                    lin.bias.copy_(layer.bias[g])
                layers += [lin] + ([nn.Tanh()] if i < len(block.layers) - 1 else [])
            self.nets.append(nn.Sequential(*layers))
        self.bias = nn.Parameter(model.bias.detach().clone())

    def forward(self, x):
        return sum(net(x[:, idx]) for net, idx in zip(self.nets, self.inputs)) + self.bias

    def prior_groups(self):
        return [[f"nets.{g}.{name}" for name, _ in net.named_parameters()]
                for g, net in enumerate(self.nets)] + [["bias"]]


def test_kron_evidence_equals_separate_linear_subnetworks():
    model = _model()
    X, y = _data(11)
    ref = _SeparateSubnetworks(model)
    torch.testing.assert_close(ref(X), model(X), rtol=0, atol=1e-13)
    la, delta = _kron(model, X, y)
    la_ref = Laplace(ref, "regression", hessian_structure="kron", sigma_noise=0.7,
                     prior_precision=delta, prior_groups=ref.prior_groups())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "KFAC cannot express")
        la_ref.fit(_loader(X, y))
    torch.testing.assert_close(la.log_marginal_likelihood(), la_ref.log_marginal_likelihood(),
                               rtol=1e-10, atol=1e-10)
    grid = torch.randn(5, D, dtype=torch.float64)
    (m, v), (m_ref, v_ref) = la(grid), la_ref(grid)
    torch.testing.assert_close(m, m_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-12)


def test_kron_evidence_is_not_the_exact_one_off_the_single_point():
    """The check above can fail: with several points KFAC differs from the exact GGN."""
    model = _model()
    X, y = _data(11)
    la, delta = _kron(model, X, y)
    J = _dense_jacobian(model, lambda p: functional_call(model, p, (X,)))
    P = torch.einsum("ncp,ncq->pq", J, J) / 0.7**2 + torch.diag(_delta_per_parameter(model,
                                                                                       delta))
    assert not torch.allclose(la.posterior_precision, P, rtol=1e-3)
    assert math.isfinite(float(la.log_marginal_likelihood()))


def test_fit_additive_defaults_to_kron_without_warnings():
    X, y = _data(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_additive(X.float(), y.float()[:, 0], hidden=(4,), n_epochs=3, batch_size=10,
                           n_epochs_burnin=1, marglik_frequency=1, n_hypersteps=2)
    assert fit.la.hessian_structure == "kron"
    assert any(isinstance(b, Kronecker) for b in fit.la.H.blocks)
    assert fit.feature_precisions.shape == (D,)
    with pytest.raises(ValueError, match="hessian_structure must be one of"):
        fit_additive(X, y, hessian_structure="lowrank", n_epochs=1)
