"""What each function-space posterior computes: marglik, laplace-torch 0.3, dense float64.

    lt-venv/bin/python benchmarks/functional_agreement.py     # JSON lines, about a minute

A tiny problem where everything can be written out: the first N = 120 training digits
(``load_digits_split``), an MLP 64-6-10 (460 parameters, float64; for classification also
64-6-6-10, two hidden layers, 502 parameters) trained by 300 full-batch Adam
steps (lr 1e-2, seed 0), δ = 1.5, subsets of M ∈ {30, 120} points (M = N is the exact
posterior). Dense references from ``torch.func.jacrev`` Jacobians J (N, C, P), explicit P × P
matrices and inverses:

- **Laplace** (the weight-space GGN Laplace posterior conditioned on the subset S, what marglik's
  ``FunctionalLaplace`` documents): H_S = Σ_{n∈S} J_nᵀ Λ_n J_n with the full softmax Hessian
  Λ_n = diag(p_n) − p_n p_nᵀ, Σ = (δI + H_S)⁻¹, test covariance J* Σ J*ᵀ, evidence
  log p(D|θ*) − ½ δ‖θ*‖² − ½ (N/M) (log det(δI + H_S) − P log δ) with the data fit over all N;
- **laplace-torch's definition** (``FunctionalLaplace`` 0.3, read from its source): the kernel
  κ J Jᵀ with κ = (M/N)/δ at every input (test inputs included), the diagonal of Λ_n, i.e. the
  weight-space posterior (δN/M · I + Σ_{n∈S} J_nᵀ diag(Λ_n) J_n)⁻¹; evidence
  −CE over the M points only − ½ log det(I + D^½ κK D^½) − ½ μᵀ(κK + 10⁻⁵ I)⁻¹ μ with μ = J_S θ*
  (R&W eq. 3.44 with f̂ = J θ*).

Each library is compared with its own reference and with the other; with two hidden layers
laplace-torch's predictive covariance is not its own definition but equals, to rounding, the
same formula with the cross-kernel's test and training output axes swapped
(:func:`swapped_cross_kernel`), and can have negative eigenvalues; ``kind: "regression"``
repeats the predictive check for a Gaussian likelihood (Λ = I/σ², so the diagonal is exact),
where the two libraries' exact posteriors (M = N) define the same thing.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split

N, DELTA, SIZES, SIGMA = 120, 1.5, (30, 120), 0.7


def tiny_problem(regression: bool = False, hidden: int = 1):
    torch.manual_seed(0)
    x, y, xt, _ = load_digits_split(dtype=torch.float64, flatten=True)
    x, y, xt = x[:N], y[:N], xt[:50]
    out = 1 if regression else 10
    deeper = [nn.Linear(6, 6), nn.Tanh()] if hidden == 2 else []
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), *deeper, nn.Linear(6, out)).double()
    if regression:  # a smooth target: the mean pixel intensity, standardised
        y = ((x.mean(1) - x.mean()) / x.mean(1).std())[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        f = model(x)
        loss = ((f - y).square().sum() / (2 * SIGMA**2) if regression
                else nn.functional.cross_entropy(f, y, reduction="sum"))
        (loss + 0.5 * DELTA * sum(p.square().sum() for p in model.parameters())).backward()
        opt.step()
    return model.eval(), x, y, xt


def dense_jacobians(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f (B, C) and J (B, C, P) by torch.func, parameters flattened in named_parameters order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, parts, (x,))

    return f(theta).detach(), jacrev(f)(theta).detach(), theta


def reference_laplace(model, x, y, xt, idx, delta):
    """Weight-space GGN Laplace on the points idx, data fit over all N (marglik's definition)."""
    f, J, theta = dense_jacobians(model, x)
    _, Jt, _ = dense_jacobians(model, xt)
    p = f.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    H = torch.einsum("ncp,ncd,ndq->pq", J[idx], lam[idx], J[idx])
    P = theta.numel()
    prec = delta * torch.eye(P, dtype=H.dtype) + H
    cov = torch.einsum("bcp,pq,bdq->bcd", Jt, torch.linalg.inv(prec), Jt)
    loglik = -nn.functional.cross_entropy(f, y, reduction="sum")
    logdet = torch.linalg.slogdet(prec)[1] - P * math.log(delta)
    ev = loglik - 0.5 * delta * theta.square().sum() - 0.5 * (len(x) / len(idx)) * logdet
    return cov, float(ev)


def reference_laplace_torch(model, x, y, xt, idx, delta):
    """laplace-torch 0.3 FunctionalLaplace's formulas, written out densely."""
    f, J, theta = dense_jacobians(model, x)
    _, Jt, _ = dense_jacobians(model, xt)
    m, C = len(idx), f.shape[1]
    kappa = (m / len(x)) / delta
    swapped = swapped_cross_kernel(J[idx], Jt, f[idx], kappa)
    p = f[idx].softmax(-1)
    lam = (p - p * p).reshape(-1)  # the diagonal of Λ, (M·C,)
    Js = J[idx].reshape(m * C, -1)
    K = Js @ Js.T
    eye = torch.eye(theta.numel(), dtype=K.dtype)
    prec = (delta * len(x) / m) * eye + Js.T @ (lam[:, None] * Js)
    cov = torch.einsum("bcp,pq,bdq->bcd", Jt, torch.linalg.inv(prec), Jt)
    w = lam.sqrt()
    logdet = torch.linalg.slogdet(torch.eye(m * C, dtype=K.dtype) + w[:, None] * kappa * K * w)[1]
    mu = Js @ theta
    scatter = mu @ torch.linalg.solve(kappa * K + 1e-5 * torch.eye(m * C, dtype=K.dtype), mu)
    loglik = -nn.functional.cross_entropy(f[idx], y[idx], reduction="sum")
    return cov, float(loglik - 0.5 * (logdet + scatter)), swapped


def swapped_cross_kernel(J, Jt, f, kappa):
    """laplace-torch 0.3's per-input predictive covariance as its ``_build_K_star_M`` computes
    it: the blocks K[b, m, c, e] = κ J*(x_b)_c · J(x_m)_e reshaped to (B, M·C, C) with the
    test output c in the row index, where the solve needs the training output e."""
    p = f.softmax(-1)
    lam = (p - p * p).reshape(-1)
    Jf = J.reshape(-1, J.shape[-1])
    S = kappa * Jf @ Jf.T + torch.diag(1 / lam)
    K = kappa * torch.einsum("bcp,mep->bmce", Jt, J).reshape(len(Jt), -1, f.shape[1])
    return kappa * torch.einsum("bcp,bep->bce", Jt, Jt) - K.mT @ torch.linalg.solve(S, K)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def classification(hidden: int) -> list[dict]:
    import laplace

    model, x, y, xt = tiny_problem(hidden=hidden)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    names = [n for n, _ in model.named_parameters()]
    lines = []
    for m in SIZES:
        ml = marglik.FunctionalLaplace(copy.deepcopy(model), "classification",
                                       prior_precision=DELTA, prior_groups=[names],
                                       n_subset=m, seed=0)
        ml.fit(loader)
        idx = ml.indices
        lt = laplace.FunctionalLaplace(copy.deepcopy(model), "classification", n_subset=m,
                                       prior_precision=DELTA)
        chosen = idx.tolist()  # marglik's M points, in laplace-torch's sampler
        lt._get_SoD_data_loader = lambda ld, chosen=chosen: DataLoader(
            ld.dataset, batch_size=ld.batch_size, sampler=chosen, shuffle=False)
        lt.fit(loader)
        cov_ref, ev_ref = reference_laplace(model, x, y, xt, idx, DELTA)
        cov_lref, ev_lref, cov_swapped = reference_laplace_torch(model, x, y, xt, idx, DELTA)
        _, cov_ml = ml.functional_moments(xt)
        _, cov_lt = lt.predictive_moments(xt)
        ev_ml = float(ml.log_marginal_likelihood())
        ev_lt = float(lt.log_marginal_likelihood())
        lines.append({
            "kind": "classification", "hidden_layers": hidden, "N": N, "M": m, "delta": DELTA,
            "P": sum(p.numel() for p in model.parameters()),
            "marglik_vs_laplace_ref": {"cov_rel": rel(cov_ml, cov_ref),
                                       "evidence": ev_ml, "ref": ev_ref,
                                       "evidence_rel": abs(ev_ml - ev_ref) / abs(ev_ref)},
            "laplace_torch_vs_its_ref": {"cov_rel": rel(cov_lt, cov_lref),
                                         "evidence": ev_lt, "ref": ev_lref,
                                         "evidence_rel": abs(ev_lt - ev_lref) / abs(ev_lref)},
            "laplace_torch_vs_laplace_ref": {"cov_rel": rel(cov_lt, cov_ref),
                                             "evidence_diff": ev_lt - ev_ref},
            "laplace_torch_vs_swapped_cross_kernel_cov_rel": rel(cov_lt, cov_swapped),
            "laplace_torch_min_cov_eig": float(torch.linalg.eigvalsh(cov_lt).min()),
        })
    return lines


def regression() -> dict:
    import laplace

    model, x, y, xt = tiny_problem(regression=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    names = [n for n, _ in model.named_parameters()]
    ml = marglik.FunctionalLaplace(copy.deepcopy(model), "regression", prior_precision=DELTA,
                                   sigma_noise=SIGMA, prior_groups=[names])
    ml.fit(loader)
    lt = laplace.FunctionalLaplace(copy.deepcopy(model), "regression", n_subset=N,
                                   prior_precision=DELTA, sigma_noise=SIGMA)
    lt._get_SoD_data_loader = lambda ld: DataLoader(ld.dataset, batch_size=ld.batch_size,
                                                    shuffle=False)
    lt.fit(loader)
    f, J, theta = dense_jacobians(model, x)
    _, Jt, _ = dense_jacobians(model, xt)
    Jf = J.reshape(N, -1)
    eye_p = torch.eye(theta.numel(), dtype=Jf.dtype)

    def reference(sigma: float) -> tuple[torch.Tensor, float, float]:
        """Dense Laplace (covariance, evidence) and the exact GP log marginal likelihood of
        the linearised model y ~ N(f − Jθ*, JJᵀ/δ + σ²I)."""
        prec = DELTA * eye_p + Jf.T @ Jf / sigma**2
        cov = torch.einsum("bcp,pq,bdq->bcd", Jt, torch.linalg.inv(prec), Jt)
        loglik = -((y - f).square().sum() / (2 * sigma**2)
                   + N * math.log(sigma * math.sqrt(2 * math.pi)))
        ev = (loglik - 0.5 * DELTA * theta.square().sum()
              - 0.5 * (torch.linalg.slogdet(prec)[1] - theta.numel() * math.log(DELTA)))
        r = (y - f).reshape(-1) + Jf @ theta
        G = Jf @ Jf.T / DELTA + sigma**2 * torch.eye(N, dtype=Jf.dtype)
        gp = -0.5 * (r @ torch.linalg.solve(G, r) + torch.linalg.slogdet(G)[1]
                     + N * math.log(2 * math.pi))
        return cov, float(ev), float(loglik), float(gp)

    cov_ref, ev_ref, loglik, gp = reference(SIGMA)
    _, cov_ml = ml.functional_moments(xt)
    _, cov_lt = lt.predictive_moments(xt)
    ev_lt = float(lt.log_marginal_likelihood())
    # σ that each evidence prefers, on a grid (δ fixed)
    grid = torch.logspace(-1, 0.5, 61, dtype=torch.float64).tolist()
    ev_grid_lt = [float(lt.log_marginal_likelihood(sigma_noise=torch.tensor(s))) for s in grid]
    ev_grid_ref = [reference(s)[1] for s in grid]
    return {"kind": "regression", "N": N, "M": N, "delta": DELTA, "sigma": SIGMA,
            "marglik_cov_rel": rel(cov_ml, cov_ref),
            "laplace_torch_cov_rel": rel(cov_lt, cov_ref),
            "evidence_ref": ev_ref, "evidence_marglik": float(ml.log_marginal_likelihood()),
            "evidence_laplace_torch": ev_lt,
            "laplace_torch_minus_(loglik+gp_lml+N/2 log 2pi)":
                ev_lt - (loglik + gp + 0.5 * N * math.log(2 * math.pi)),
            "sigma_argmax_laplace_ref": grid[max(range(len(grid)), key=ev_grid_ref.__getitem__)],
            "sigma_argmax_laplace_torch": grid[max(range(len(grid)), key=ev_grid_lt.__getitem__)]}


def ella() -> list[dict]:
    """ELLA against its own definition (the GGN of all N points restricted to its basis U,
    full Λ) and against the exact posterior: U(UᵀAU)⁻¹Uᵀ ≼ A⁻¹ for orthonormal U."""
    import laplace

    model, x, y, xt = tiny_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    f, J, theta = dense_jacobians(model, x)
    _, Jt, _ = dense_jacobians(model, xt)
    p = f.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    A = DELTA * torch.eye(theta.numel(), dtype=J.dtype) + torch.einsum(
        "ncp,ncd,ndq->pq", J, lam, J)
    exact = torch.einsum("bcp,pq,bdq->bcd", Jt, torch.linalg.inv(A), Jt)
    lines = []
    for m in SIZES[:1] + (60,):
        la = laplace.ELLA(copy.deepcopy(model), "classification", subsample_size=m,
                          n_eigenvalues=m, prior_precision=DELTA, seed=0)
        la.fit(loader)
        U = la.dual_directions.double()
        ref = torch.einsum("bcp,pk,kl,ql,bdq->bcd", Jt, U,
                           torch.linalg.inv(U.T @ A @ U), U, Jt)
        _, cov = la.predictive_moments(xt)
        gap = torch.linalg.eigvalsh(exact - cov)  # ≥ 0 when ELLA's covariance ≼ the exact one
        lines.append({"kind": "ella", "N": N, "M": m, "delta": DELTA,
                      "cov_rel_vs_own_definition": rel(cov, ref),
                      "basis_orthonormal_err": float((U.T @ U - torch.eye(m)).abs().max()),
                      "min_eig_exact_minus_ella": float(gap.min()),
                      "mean_var_ratio_ella_over_exact": float(
                          (cov.diagonal(dim1=1, dim2=2) / exact.diagonal(dim1=1, dim2=2)).mean())})
    return lines


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for line in classification(1) + classification(2) + [regression()] + ella():
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
