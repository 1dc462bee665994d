"""Last-layer Laplace against a Gaussian variational posterior on users' digits networks.

    python docs/calibration_variational.py        # docs/calibration.md §8; ~25 min at load 9

An exploration for issue 18 (docs/calibration.md §7: every posterior is underconfident on a
well-regularised network). For the networks of ``calibration_experiments.user_model`` (MLP
64-64-64-10, Adam, weight decay 1e-3 and 0, four digits splits) the last layer on fixed features
φ(x) = (penultimate activations, 1) is a multinomial logistic regression, so everything is exact
and dense in float64 (P = 650):

- δ maximises the Laplace evidence at the regression's own mode W_δ (a grid of 45 values of
  log δ in [−3, 8]; the mode by L-BFGS), Σ = (GGN(W_δ) + δ I)⁻¹;
- the variational Gaussian q = N(m, S) maximises the ELBO E_q[log p(y | φ W)] − KL(q ‖ p) over m,
  S = L Lᵀ and log δ (reparameterised, 64 samples per step, 1,500 Adam steps at lr 1e-3, started
  at (W_δ, Σ, δ));
- predictives: Monte Carlo over the logits' Gaussian (4,000 samples), with the mean of the
  network (``meanmap``), of the Laplace mode (``meanmode``) or of q.

Prints test NLL / ECE per network against the MAP.
"""

from __future__ import annotations

import math

import torch
from calibration_experiments import user_model
from torch.nn.functional import cross_entropy

from marglik import metrics

C = 10


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = model[:-1](x.double())
    return torch.cat([h, torch.ones(len(h), 1)], 1)


def mode(phi: torch.Tensor, y: torch.Tensor, delta: float, start: torch.Tensor) -> torch.Tensor:
    w = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        loss = cross_entropy(phi @ w, y, reduction="sum") + 0.5 * delta * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def ggn(phi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_n (φ_n φ_nᵀ) ⊗ Λ_n in the order of w.reshape(-1) (D, C) -> (D·C, D·C)."""
    p = torch.softmax(phi @ w, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nd,ne,nck->dcek", phi, phi, lam).reshape(w.numel(), w.numel())


def log_evidence(phi, y, w, delta: float) -> float:
    P = w.numel()
    fit = -cross_entropy(phi @ w, y, reduction="sum") - 0.5 * delta * w.square().sum()
    return float(fit - 0.5 * torch.logdet(ggn(phi, w) + delta * torch.eye(P))
                 + 0.5 * P * math.log(delta))


def predict(phi, mean_logits, cov, g, samples: int = 4000) -> torch.Tensor:
    D = phi.shape[1]
    v = torch.einsum("nd,dcek,ne->nck", phi, cov.reshape(D, C, D, C), phi)
    chol = torch.linalg.cholesky(v + 1e-10 * torch.eye(C))
    eps = torch.randn(samples, *mean_logits.shape, generator=g)
    return torch.softmax(mean_logits + torch.einsum("nck,snk->snc", chol, eps), -1).mean(0)


def variational(phi, y, delta, m0, cov0, g, steps: int = 1500, samples: int = 64):
    D = m0.shape[0]
    P = D * C
    m = m0.reshape(-1).clone().requires_grad_(True)
    chol = torch.linalg.cholesky(cov0).requires_grad_(True)
    log_delta = torch.tensor(math.log(delta), requires_grad=True)
    opt = torch.optim.Adam([m, chol, log_delta], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        L = torch.tril(chol)
        w = (m + torch.randn(samples, P, generator=g) @ L.T).reshape(samples, D, C)
        f = torch.einsum("nd,sdc->snc", phi, w)
        ell = -cross_entropy(f.reshape(-1, C), y.repeat(samples), reduction="sum") / samples
        d = log_delta.exp()
        kl = 0.5 * (d * (L.square().sum() + m.square().sum()) - P - P * log_delta
                    - 2 * torch.diagonal(L).abs().log().sum())
        (kl - ell).backward()
        opt.step()
    L = torch.tril(chol).detach()
    return m.detach().reshape(D, C), L @ L.T, float(log_delta.exp())


def main() -> None:
    torch.set_num_threads(1)
    for wd in (1e-3, 0.0):
        for seed in range(4):
            model, (x, y), (xt, yt) = user_model(seed, wd)  # float32, as users train
            torch.set_default_dtype(torch.float64)
            model = model.double()
            phi, phit = features(model, x), features(model, xt)
            w0 = torch.cat([model[-1].weight.T, model[-1].bias[None]], 0).detach()
            g = torch.Generator().manual_seed(0)
            best = max(((log_evidence(phi, y, w := mode(phi, y, d, w0), d), d, w)
                        for d in torch.linspace(-3, 8, 45).exp().tolist()),
                       key=lambda t: t[0])
            _, delta, w = best
            cov = torch.linalg.inv(ggn(phi, w) + delta * torch.eye(w.numel()))
            m, cov_q, delta_q = variational(phi, y, delta, w, cov, g)
            rows = {"map": torch.softmax(phit @ w0, -1),
                    "laplace_meanmap": predict(phit, phit @ w0, cov, g),
                    "laplace_meanmode": predict(phit, phit @ w, cov, g),
                    "vi": predict(phit, phit @ m, cov_q, g),
                    "vi_cov_meanmap": predict(phit, phit @ w0, cov_q, g)}
            cells = " ".join(f"{k}={metrics.nll(p, yt).item():.4f}/{metrics.ece(p, yt).item():.4f}"
                             for k, p in rows.items())
            print(f"wd={wd} split={seed} delta_laplace={delta:.3g} delta_vi={delta_q:.3g} "
                  f"| {cells}", flush=True)
            torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
