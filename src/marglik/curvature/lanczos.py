"""Low-rank curvature: top-k eigenpairs of the GGN by Lanczos with matrix-free products.

GGN-vector products Hv = Σ_n J_nᵀ Λ_n J_n v use one forward-mode (jvp) and one reverse-mode (vjp)
pass per batch — the P×P matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from marglik.curvature.batches import Inputs, model_args
from marglik.curvature.columns import output_columns
from marglik.curvature.subsets import ParameterSubset
from marglik.distributed import all_reduce_tensor
from marglik.likelihoods import Likelihood


def ggn_matvec(
    model: nn.Module,
    likelihood: Likelihood,
    batches: Iterable[tuple[Inputs, Tensor]],
    subset: ParameterSubset,
    curvature: str = "ggn",
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """Return v ↦ H v for v of shape (P,), summed over ``batches`` (and ranks).

    For ``"ggn"`` Λ is applied exactly per position; for ``"ef"``/``"ggn-mc"``/``"ggn-sampled"``
    through the per-sample output columns (random columns are re-drawn with the same seed on
    every call, so the operator is fixed).
    """
    params = {n: p.detach() for n, p in subset.parameters(model).items()}
    sizes = [p.numel() for p in params.values()]
    total = sum(sizes)

    def to_dict(v_flat: Tensor) -> dict[str, Tensor]:
        if subset.index is not None:
            full = v_flat.new_zeros(total)
            full[subset.index] = v_flat
            v_flat = full
        return {n: c.reshape(p.shape) for (n, p), c in zip(params.items(), v_flat.split(sizes))}

    def matvec(v: Tensor) -> Tensor:
        out = torch.zeros(total, dtype=v.dtype, device=v.device)
        for i, (x, y) in enumerate(batches):

            def f(p: dict[str, Tensor], x: Inputs = x) -> Tensor:
                return functional_call(model, p, model_args(x))

            f0, Jv = jvp(f, (params,), (to_dict(v.to(next(iter(params.values())))),))
            f0, y = likelihood.validate(f0.detach(), y)
            if curvature == "ggn":
                w = (likelihood.hessian(f0, y) @ Jv.unsqueeze(-1)).squeeze(-1)
            else:
                gen = torch.Generator(device=f0.device).manual_seed(seed + i)
                U = output_columns(likelihood, f0, y, curvature, generator=gen)
                inner = (U * Jv).reshape(U.shape[0], U.shape[1], -1).sum(-1)
                w = (U * inner.reshape(*inner.shape, *[1] * (U.ndim - 2))).sum(0)
            _, vjp_fn = vjp(f, params)
            (g,) = vjp_fn(w.to(f0))
            out += torch.cat([t.reshape(-1) for t in g.values()]).to(out)
        out = all_reduce_tensor(out)
        return out if subset.index is None else out[subset.index]

    return matvec


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    size: int,
    rank: int,
    n_iter: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of a PSD operator by Lanczos with full re-orthogonalisation.

    Returns:
        (eigenvalues (rank,) in descending order, clamped at 0; eigenvectors (size, rank)).
    """
    if not 0 < rank <= size:
        raise ValueError(f"rank must lie in [1, {size}], got {rank}")
    m = min(size, n_iter or 2 * rank + 20)
    gen = torch.Generator(device=device).manual_seed(seed)

    def random_orthogonal(Q: Tensor) -> Tensor:
        w = torch.randn(size, generator=gen, dtype=dtype, device=device)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        return w / w.norm()

    Q = torch.zeros(m, size, dtype=dtype, device=device)
    Q[0] = random_orthogonal(Q[:0])
    alpha, beta = torch.zeros(m, dtype=dtype), torch.zeros(m, dtype=dtype)
    for j in range(m):
        w = matvec(Q[j]).to(dtype)
        alpha[j] = w @ Q[j]
        for _ in range(2):  # full re-orthogonalisation, twice for stability
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        if j + 1 == m:
            break
        beta[j] = w.norm()
        if beta[j] <= 1e-10 * alpha[: j + 1].abs().max().clamp_min(1e-30):
            # invariant subspace (e.g. repeated eigenvalues): restart orthogonally to it
            beta[j] = 0.0
            Q[j + 1] = random_orthogonal(Q[: j + 1])
        else:
            Q[j + 1] = w / beta[j]
    T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    evals, S = torch.linalg.eigh(T.to(device))
    order = evals.argsort(descending=True)[:rank]
    vecs = Q.T @ S[:, order]
    vals = evals[order].clamp_min(0)
    return vals, vecs
