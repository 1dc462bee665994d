"""Graph convolution layers: deterministic and mean-field Gaussian (variational).

The propagation rule of Kipf & Welling (ICLR 2017, eq. 2), ``H' = Â H W + b``, with Â the
normalised adjacency (:mod:`.adjacency`), and its Bayesian version with a factorised Gaussian
posterior over W and b (Blundell et al., "Weight Uncertainty in Neural Networks", ICML 2015):

    q(w) = Π_k N(w_k; μ_k, σ_k²),   σ_k = softplus(ρ_k),
    w = μ + σ ⊙ ε,  ε ~ N(0, I)      (reparameterisation),
    KL(q ‖ p) = Σ_k [log(s/σ_k) + (σ_k² + μ_k²)/(2s²) − 1/2]   for the prior p = N(0, s² I).

Each layer hands out its weights as a pair ``(W, b)`` (the mean, or a draw), and
:func:`gcn_propagate` applies a pair, so one draw can be used for several views of a graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marglik.errors import MarglikError

__all__ = ["BayesianGCNLayer", "GCNLayer", "gaussian_kl", "gcn_propagate"]


def gcn_propagate(x: Tensor, adj: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``Â x W + b``.

    Args:
        x: Node features, shape ``(N, D_in)``.
        adj: Â, sparse or dense, shape ``(N, N)``.
        weight: W, shape ``(D_in, D_out)``.
        bias: b, shape ``(D_out,)``, or ``None``.

    Returns:
        Shape ``(N, D_out)``.
    """
    if x.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise MarglikError(
            f"node features must have shape (N, {weight.shape[0]}), got {tuple(x.shape)}")
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1] or adj.shape[0] != x.shape[0]:
        raise MarglikError(
            f"adjacency must have shape ({x.shape[0]}, {x.shape[0]}), got {tuple(adj.shape)}")
    xw = x @ weight
    out = torch.sparse.mm(adj, xw) if adj.is_sparse else adj @ xw
    return out if bias is None else out + bias


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_std: float | Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, s² I)), summed over all entries; a 0-d tensor.

    Args:
        mu: Posterior means, any shape.
        sigma: Posterior standard deviations (> 0), the shape of ``mu``.
        prior_std: s > 0, a float or a 0-d tensor (differentiable).
    """
    s = torch.as_tensor(prior_std, dtype=mu.dtype, device=mu.device)
    if (s <= 0).any():
        raise MarglikError(f"prior_std must be positive, got {float(s)}")
    var_ratio = (sigma / s) ** 2
    return 0.5 * (var_ratio + (mu / s) ** 2 - 1.0 - torch.log(var_ratio)).sum()


def _glorot(d_in: int, d_out: int) -> Tensor:
    bound = math.sqrt(6.0 / (d_in + d_out))
    return torch.empty(d_in, d_out).uniform_(-bound, bound)


def _check_sizes(d_in: int, d_out: int) -> None:
    for name, d in (("in_features", d_in), ("out_features", d_out)):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise MarglikError(f"{name} must be a positive integer, got {d!r}")


class GCNLayer(nn.Module):
    """A graph convolution ``Â H W + b`` (Kipf & Welling, ICLR 2017), Glorot-initialised."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        _check_sizes(in_features, out_features)
        self.weight = nn.Parameter(_glorot(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def mean(self) -> tuple[Tensor, Tensor | None]:
        """The weights ``(W (D_in, D_out), b (D_out,) or None)``."""
        return self.weight, self.bias

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """The weights (a point mass: every draw is the mean)."""
        return self.mean()

    def kl(self) -> Tensor:
        """0: a deterministic layer has no posterior."""
        return self.weight.new_zeros(())

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return gcn_propagate(x, adj, self.weight, self.bias)


class BayesianGCNLayer(nn.Module):
    """A graph convolution with mean-field Gaussian weights and a N(0, s²) prior.

    Parameters ``weight_mu``, ``weight_rho`` ``(D_in, D_out)`` and ``bias_mu``, ``bias_rho``
    ``(D_out,)``; σ = softplus(ρ). Means start Glorot-uniform (bias 0), σ at ``init_std``.

    Args:
        in_features: D_in.
        out_features: D_out.
        prior_std: s, the prior standard deviation of every weight and bias.
        init_std: σ at initialisation.
    """

    def __init__(self, in_features: int, out_features: int, prior_std: float = 1.0,
                 init_std: float = 1e-2):
        super().__init__()
        _check_sizes(in_features, out_features)
        if not prior_std > 0:
            raise MarglikError(f"prior_std must be positive, got {prior_std!r}")
        if not init_std > 0:
            raise MarglikError(f"init_std must be positive, got {init_std!r}")
        self.prior_std = float(prior_std)
        rho0 = math.log(math.expm1(init_std))  # softplus⁻¹(init_std)
        self.weight_mu = nn.Parameter(_glorot(in_features, out_features))
        self.weight_rho = nn.Parameter(torch.full((in_features, out_features), rho0))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), rho0))

    def stds(self) -> tuple[Tensor, Tensor]:
        """σ of the weight ``(D_in, D_out)`` and of the bias ``(D_out,)``."""
        return F.softplus(self.weight_rho), F.softplus(self.bias_rho)

    def mean(self) -> tuple[Tensor, Tensor]:
        """The posterior means ``(μ_W, μ_b)``."""
        return self.weight_mu, self.bias_mu

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One reparameterised draw ``(μ_W + σ_W ε_W, μ_b + σ_b ε_b)``; differentiable."""
        sw, sb = self.stds()
        ew = torch.randn(sw.shape, generator=generator, dtype=sw.dtype, device=sw.device)
        eb = torch.randn(sb.shape, generator=generator, dtype=sb.dtype, device=sb.device)
        return self.weight_mu + sw * ew, self.bias_mu + sb * eb

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, s² I)) of the weight and the bias together; 0-d."""
        sw, sb = self.stds()
        return (gaussian_kl(self.weight_mu, sw, self.prior_std)
                + gaussian_kl(self.bias_mu, sb, self.prior_std))

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        """One draw of the layer's output (a fresh ε per call)."""
        return gcn_propagate(x, adj, *self.sample())
