"""Recurrent models (GRU, LSTM, RNN): curvature, evidence and GLM variance against brute force.

``torch.func.vmap`` cannot run torch's recurrent layers per sample; the per-sample path falls back
to one backward pass per sample (with a warning). The reference here uses plain autograd
Jacobians sample by sample, independent of marglik.
"""

import warnings

import pytest
import torch
from torch import nn

import marglik


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(2, 3, batch_first=True)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def jacobian(model, x):
    """J (N, D, P) of the flattened outputs w.r.t. all parameters, sample by sample."""
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def f(*params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x1,)).reshape(-1)

    rows = []
    for n in range(x.shape[0]):
        x1 = x[n : n + 1]
        J = torch.autograd.functional.jacobian(f, values)
        rows.append(torch.cat([j.reshape(j.shape[0], -1) for j in J], 1))
    return torch.stack(rows)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_recurrent_regressor_curvature_evidence_and_variance_equal_brute_force(cell, structure):
    model = Recurrent(cell)
    x, y = torch.randn(7, 4, 2), torch.randn(7, 2)
    sigma = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vmap fallback and KFAC's diagonal blocks
        la = marglik.Laplace(model, "regression", hessian_structure=structure,
                             sigma_noise=sigma).fit([(x, y)])
        J = jacobian(model, x)
        H = torch.einsum("ndp,ndq->pq", J, J) / sigma**2  # Gaussian GGN
        if structure == "diag":
            torch.testing.assert_close(la.H.to_dense().diagonal(), H.diagonal(), rtol=1e-10,
                                       atol=1e-12)
        elif structure == "full":
            torch.testing.assert_close(la.H.to_dense(), H, rtol=1e-10, atol=1e-12)
        else:  # recurrent weights: exact diagonal blocks; the head's weight and bias blocks are
            # exact (a last linear layer with a Gaussian likelihood: constant output Hessian)
            n_rnn = sum(p.numel() for p in model.rnn.parameters())
            torch.testing.assert_close(la.H.to_dense()[:n_rnn, :n_rnn].diagonal(),
                                       H[:n_rnn, :n_rnn].diagonal(), rtol=1e-10, atol=1e-12)
            w, b = slice(n_rnn, n_rnn + 6), slice(n_rnn + 6, None)  # head: weight G⊗A, bias G
            for block in (w, b):
                torch.testing.assert_close(la.H.to_dense()[block, block], H[block, block],
                                           rtol=1e-10, atol=1e-12)
        # GLM variance J Σ Jᵀ with the posterior's own Σ
        xt = torch.randn(3, 4, 2)
        _, var = la(xt)
        Jt = jacobian(model, xt)
        expected = Jt @ la.posterior_covariance @ Jt.mT
        torch.testing.assert_close(var, expected, rtol=1e-9, atol=1e-12)
        # evidence with explicit matrices
        P0 = torch.eye(la.n_params)
        Hs = la.H.to_dense()
        theta = la.mean
        log_lik = la.log_likelihood()
        ref = (log_lik - 0.5 * theta @ theta
               - 0.5 * (torch.linalg.slogdet(Hs + P0)[1] - torch.linalg.slogdet(P0)[1]))
        torch.testing.assert_close(la.log_marginal_likelihood(), ref, rtol=1e-10, atol=1e-10)


def test_the_vmap_fallback_warns_once_and_names_the_model():
    model = Recurrent(nn.GRU)
    from marglik.curvature import per_sample

    per_sample._WARNED.discard(Recurrent)
    with pytest.warns(UserWarning, match="cannot run Recurrent per sample"):
        marglik.Laplace(model, "regression", hessian_structure="full").fit(
            [(torch.randn(5, 3, 2), torch.randn(5, 2))]
        )
