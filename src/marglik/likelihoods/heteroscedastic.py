"""Heteroscedastic Gaussian likelihood in natural parameters (Immer et al., NeurIPS 2023).

The network predicts two outputs per position, f = (g1, g2), mapped by a fixed *head* to the natural
parameters of a Gaussian,

    η1 = g1,    η2 = −½ softplus(g2)   (or −½ exp(g2)),

so that μ = −η1 / (2η2) and σ² = −1 / (2η2). In η the negative log-likelihood

    −log p(y | η) = −η1 y − η2 y² − η1² / (4η2) − ½ log(−2η2) + ½ log 2π

is convex, with η-Hessian equal to the covariance of the sufficient statistics T = (y, y²):

    Λ_η = [[σ²,    2μσ²         ],
           [2μσ²,  2σ⁴ + 4μ²σ²  ]]   (positive definite: det Λ_η = 2σ⁶ > 0).

Writing y = μ + σz gives Λ_η = v1 v1ᵀ + v2 v2ᵀ with v1 = (σ, 2μσ) (the z part) and v2 = (0, √2 σ²)
(the z² − 1 part), i.e. the lower Cholesky factor L = [v1 v2].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.likelihoods.base import Likelihood

_POSITIVITY = ("softplus", "exp")


class NaturalGaussian(Likelihood):
    """Heteroscedastic Gaussian p(y | f) = N(y; μ(f), σ²(f)) parametrised by natural parameters.

    Args:
        positivity: the head of the second output, ``"softplus"`` (η2 = −½ softplus(g2), default, as
            in the paper) or ``"exp"`` (η2 = −½ exp(g2)).

    Shapes: outputs ``f`` (N, *S, 2) = (g1, g2); targets ``y`` (N, *S) or (N, *S, 1).

    Output Hessian, GGN convention (Immer et al., 2023, §3): with the diagonal head Jacobian
    J_h = ∂η/∂f = diag(1, h'(g2)) (h' = −½ sigmoid(g2) for softplus, −½ exp(g2) for exp),

        Λ_f = J_hᵀ Λ_η J_h,    V = J_hᵀ L  (Λ_f = V Vᵀ),

    which drops the head-curvature term diag(0, h''(g2) · ∂NLL/∂η2). That term makes the exact
    f-Hessian indefinite (it changes sign with y² − μ² − σ²); the GGN keeps the positive
    semi-definite part, which is what Laplace and KFAC need. ``hessian(f, y, exact=True)`` returns
    the exact f-Hessian (for tests and diagnostics only).
    """

    task = "heteroscedastic"

    def __init__(self, positivity: str = "softplus"):
        if positivity not in _POSITIVITY:
            raise ValueError(f"positivity must be one of {_POSITIVITY}, got {positivity!r}")
        self.positivity = positivity

    # ---- shapes ----------------------------------------------------------------------------------
    def validate(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Check f (N, *S, 2) against y (N, *S) or (N, *S, 1); return ``y`` as (N, *S) in f's dtype.

        Raises:
            ValueError: on a last output dimension other than 2, mismatched shapes or NaN/inf.
        """
        f, y = super().validate(f, y)
        if f.ndim < 2 or f.shape[-1] != 2:
            raise ValueError(
                "heteroscedastic model outputs must have shape (N, *S, 2) = (g1, g2), "
                f"got {tuple(f.shape)}"
            )
        if y.shape == f.shape[:-1] + (1,):
            y = y.squeeze(-1)
        if y.shape != f.shape[:-1]:
            raise ValueError(
                f"regression targets of shape {tuple(y.shape)} do not match model outputs of shape "
                f"{tuple(f.shape)}: expected {tuple(f.shape[:-1])} or {tuple(f.shape[:-1]) + (1,)}"
            )
        return f, y.to(f.dtype)

    # ---- the head ---------------------------------------------------------------------------
    def _precision(self, g2: Tensor) -> Tensor:
        """1/σ² = −2η2 = softplus(g2) or exp(g2)."""
        return F.softplus(g2) if self.positivity == "softplus" else torch.exp(g2)

    def _log_precision(self, g2: Tensor) -> Tensor:
        """log(1/σ²), exact for the exp head (no overflow of exp(g2))."""
        return g2 if self.positivity == "exp" else torch.log(F.softplus(g2))

    def _head_derivatives(self, g2: Tensor) -> tuple[Tensor, Tensor]:
        """dη2/dg2 and d²η2/dg2² (both (N, *S))."""
        if self.positivity == "exp":
            d = -0.5 * torch.exp(g2)
            return d, d
        s = torch.sigmoid(g2)
        return -0.5 * s, -0.5 * s * (1 - s)

    def natural_parameters(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """η1, η2 of outputs f (N, *S, 2), each (N, *S); η2 < 0."""
        return f[..., 0], -0.5 * self._precision(f[..., 1])

    def mean_variance(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """μ = −η1/(2η2) and σ² = −1/(2η2) of outputs f (N, *S, 2), each (N, *S)."""
        precision = self._precision(f[..., 1])
        return f[..., 0] / precision, 1 / precision

    def outputs_from_natural(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """Invert the head: outputs f (..., 2) that give natural parameters η1, η2 < 0 (...)."""
        precision = -2 * eta2
        if self.positivity == "exp":
            g2 = torch.log(precision)
        else:  # softplus⁻¹(p) = p + log(1 − exp(−p))
            g2 = precision + torch.log(-torch.expm1(-precision))
        return torch.stack([eta1, g2], -1)

    # ---- likelihood ---------------------------------------------------------------------------
    def log_prob(self, f: Tensor, y: Tensor) -> Tensor:
        """Log-likelihood per sample, summed over positions: (N,).

        Uses −η1 y − η2 y² − η1²/(4η2) = −η2 (y − μ)², the same number without the cancellation.
        """
        f, y = self.validate(f, y)
        g1, g2 = f[..., 0], f[..., 1]
        precision = self._precision(g2)  # −2η2
        mu = g1 / precision
        elementwise = (
            -0.5 * precision * (y - mu) ** 2
            + 0.5 * self._log_precision(g2)
            - 0.5 * math.log(2 * math.pi)
        )
        return elementwise.reshape(f.shape[0], -1).sum(1)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """∂NLL/∂f = J_hᵀ ∂NLL/∂η with ∂NLL/∂η = (μ − y, μ² + σ² − y²): (N, *S, 2)."""
        f, y = self.validate(f, y)
        mu, var = self.mean_variance(f)
        d, _ = self._head_derivatives(f[..., 1])
        return torch.stack([mu - y, d * (mu**2 + var - y**2)], -1)

    def eta_hessian(self, f: Tensor) -> Tensor:
        """Λ_η = −∂²log p/∂η² (independent of y), (N, *S, 2, 2)."""
        mu, var = self.mean_variance(f)
        off = 2 * mu * var
        row1 = torch.stack([var, off], -1)
        row2 = torch.stack([off, 2 * var**2 + 4 * mu**2 * var], -1)
        return torch.stack([row1, row2], -2)

    def eta_hessian_factor(self, f: Tensor) -> Tensor:
        """Cholesky factor L = [v1 v2] of Λ_η, v1 = (σ, 2μσ), v2 = (0, √2σ²): (N, *S, 2, 2)."""
        mu, var = self.mean_variance(f)
        sigma = var.sqrt()
        row1 = torch.stack([sigma, torch.zeros_like(sigma)], -1)
        row2 = torch.stack([2 * mu * sigma, math.sqrt(2) * var], -1)
        return torch.stack([row1, row2], -2)

    def hessian_factor(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """V = J_hᵀ L with V Vᵀ = Λ_f (GGN convention, independent of y): (N, *S, 2, 2)."""
        L = self.eta_hessian_factor(f)
        d, _ = self._head_derivatives(f[..., 1])
        scale = torch.stack([torch.ones_like(d), d], -1).unsqueeze(-1)  # rows scaled by J_h
        return scale * L

    def hessian(self, f: Tensor, y: Tensor | None = None, exact: bool = False) -> Tensor:
        """Output Hessian w.r.t. f: the GGN J_hᵀ Λ_η J_h (default), (N, *S, 2, 2).

        Args:
            exact: add the head-curvature term diag(0, h''(g2) (μ² + σ² − y²)), giving the exact
                (possibly indefinite) −∂²log p/∂f²; needs ``y``.
        """
        d, d2 = self._head_derivatives(f[..., 1])
        scale = torch.stack([torch.ones_like(d), d], -1)
        H = scale.unsqueeze(-1) * self.eta_hessian(f) * scale.unsqueeze(-2)
        if not exact:
            return H
        if y is None:
            raise ValueError("the exact f-Hessian depends on the targets y")
        f, y = self.validate(f, y)
        mu, var = self.mean_variance(f)
        extra = d2 * (mu**2 + var - y**2)
        return H + torch.diag_embed(torch.stack([torch.zeros_like(extra), extra], -1))

    def sample(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw y ~ N(μ(f), σ²(f)): (N, *S, 1)."""
        mu, var = self.mean_variance(f)
        noise = torch.randn(mu.shape, generator=generator, dtype=f.dtype, device=f.device)
        return (mu + var.sqrt() * noise).unsqueeze(-1)


def mean_variance_to_natural(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Natural parameters η1 = μ/σ², η2 = −1/(2σ²) of a Gaussian with mean ``mu``, variance ``var``.

    Converts the outputs of a mean–variance network (any shape, ``var`` > 0) so that it can be
    compared with, or initialised from, a natural-parameter network; combine with
    :meth:`NaturalGaussian.outputs_from_natural` to obtain network outputs f.

    Raises:
        ValueError: if a variance is not positive.
    """
    var = torch.as_tensor(var)
    if (var <= 0).any():
        raise ValueError("variances must be positive")
    return mu / var, -0.5 / var
