"""Heteroscedastic regression with natural-parameter networks (Immer et al., NeurIPS 2023).

A network with two outputs f = (g1, g2) is read through
:class:`~marglik.likelihoods.NaturalGaussian` as the natural parameters of a Gaussian,
η1 = g1 and η2 = −½ h(g2) with h = softplus (or exp), so

    μ(x) = −η1 / (2η2) = g1 / h(g2),        σ²(x) = −1 / (2η2) = 1 / h(g2).

Its weights and layer-wise prior precisions are trained together by the Laplace evidence
(:func:`marglik.training.marglik_training`, no noise hyperparameter). The predictive of y is

    p(y | x, D) ≈ N(y; μ*(x), v_epi(x) + σ²*(x)),

with μ*, σ²* at the MAP weights and the epistemic variance v_epi from the linearised mean. The GLM
predictive of the Laplace posterior gives a Gaussian over the raw outputs, f(x) ~ N(f*(x), Σ_f(x))
with Σ_f = J Σ Jᵀ (``la(x)``); μ is a nonlinear function of f, so it is pushed through its
Jacobian at f* (delta method, first order):

    g_μ = ∂μ/∂(g1, g2) = (1/h(g2),  −g1 h'(g2) / h(g2)²),        v_epi = g_μᵀ Σ_f g_μ.

This equals the GLM variance of the model linearised in θ around θ* with μ as its output, since
∂μ/∂θ = g_μᵀ J. All quantities can be returned in original target units y = y_mean + y_std · y_s:
means map affinely, variances scale by y_std², log-densities shift by −log y_std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from marglik.data.standardize import Standardizer
from marglik.likelihoods.heteroscedastic import NaturalGaussian, mean_variance_to_natural
from marglik.nets import mlp
from marglik.posterior import Laplace
from marglik.training import marglik_training

__all__ = [
    "HeteroscedasticPredictive",
    "Standardisation",
    "fit_heteroscedastic",
    "heteroscedastic_predictive",
    "mean_variance_network_to_natural",
]


@dataclass
class HeteroscedasticPredictive:
    """Gaussian predictive N(mean, epistemic_var + aleatoric_var), all (B,), in target units."""

    mean: Tensor
    epistemic_var: Tensor
    aleatoric_var: Tensor

    @property
    def predictive_var(self) -> Tensor:
        """Total variance: epistemic (linearised mean) + aleatoric (σ² at the MAP), (B,)."""
        return self.epistemic_var + self.aleatoric_var

    def log_prob(self, y: Tensor) -> Tensor:
        """log N(y; mean, predictive_var) per point, (B,); ``y`` (B,) or (B, 1) in target units."""
        y = torch.as_tensor(y, dtype=self.mean.dtype, device=self.mean.device)
        if y.shape == self.mean.shape + (1,):
            y = y.squeeze(-1)
        if y.shape != self.mean.shape:
            raise ValueError(
                f"targets of shape {tuple(y.shape)} do not match {tuple(self.mean.shape)}"
            )
        var = self.predictive_var
        return -0.5 * (torch.log(2 * math.pi * var) + (y - self.mean) ** 2 / var)


def heteroscedastic_predictive(
    la: Laplace, x: Tensor, y_mean: float | Tensor = 0.0, y_std: float | Tensor = 1.0
) -> HeteroscedasticPredictive:
    """Predictive of a fitted :class:`~marglik.Laplace` with a NaturalGaussian likelihood.

    Args:
        la: fitted Laplace of a network with outputs (B, 2) = (g1, g2).
        x: inputs (B, ...) in the units the network was trained on (standardised).
        y_mean, y_std: the target standardisation; results are returned in original units.

    Returns:
        :class:`HeteroscedasticPredictive` with ``mean`` μ*(x), ``epistemic_var`` g_μᵀ Σ_f g_μ
        (delta method, see the module docstring) and ``aleatoric_var`` σ²*(x), each (B,).
    """
    lik = la.likelihood
    if not isinstance(lik, NaturalGaussian):
        raise ValueError(f"needs a NaturalGaussian likelihood, got {type(lik).__name__}")
    f_mean, f_var = la(x)  # (B, 2), (B, 2, 2): GLM predictive over the raw outputs
    if f_mean.ndim != 2 or f_mean.shape[-1] != 2:
        raise ValueError(f"expected outputs of shape (B, 2), got {tuple(f_mean.shape)}")
    with torch.enable_grad():
        f = f_mean.detach().requires_grad_(True)
        mu, var = lik.mean_variance(f)
        # rows are independent, so the gradient of the sum is the per-row Jacobian of μ: (B, 2)
        (g_mu,) = torch.autograd.grad(mu.sum(), f)
    epistemic = torch.einsum("bi,bij,bj->b", g_mu, f_var.to(g_mu), g_mu)
    y_std = torch.as_tensor(y_std, dtype=mu.dtype).reshape(())
    y_mean = torch.as_tensor(y_mean, dtype=mu.dtype).reshape(())
    return HeteroscedasticPredictive(
        mean=(y_mean + y_std * mu).detach(),
        epistemic_var=(y_std**2 * epistemic.clamp_min(0)).detach(),
        aleatoric_var=(y_std**2 * var).detach(),
    )


def mean_variance_network_to_natural(
    mean: Tensor,
    var: Tensor | None = None,
    log_var: Tensor | None = None,
    positivity: str = "softplus",
) -> Tensor:
    """Outputs f = (g1, g2) of a NaturalGaussian network equal to a mean–variance network's (μ, σ²).

    Give the variance either as ``var`` (σ² > 0) or ``log_var`` (log σ², the usual second head of a
    mean–variance network). ``positivity`` names the NaturalGaussian head to invert: ``"softplus"``
    (η2 = −½ softplus(g2), the default of :class:`NaturalGaussian`) or ``"exp"`` (η2 = −½ exp(g2),
    then g2 = −log σ² exactly). In both, g1 = η1 = μ/σ².

    Returns:
        f of shape ``mean.shape + (2,)`` with ``NaturalGaussian(positivity).mean_variance(f)``
        equal to (μ, σ²).
    """
    if (var is None) == (log_var is None):
        raise ValueError("give exactly one of var and log_var")
    mean = torch.as_tensor(mean)
    if log_var is not None:
        log_var = torch.as_tensor(log_var, dtype=mean.dtype)
        if positivity == "exp":  # exact in log space, no overflow for tiny variances
            return torch.stack([mean * torch.exp(-log_var), -log_var], -1)
        var = torch.exp(log_var)
    eta1, eta2 = mean_variance_to_natural(mean, torch.as_tensor(var, dtype=mean.dtype))
    return NaturalGaussian(positivity).outputs_from_natural(eta1, eta2)


@dataclass
class Standardisation:
    """The input and target standardisers of :func:`fit_heteroscedastic` (training statistics).

    ``x`` standardises inputs per feature ((D,) statistics), ``y`` the targets (0-dim statistics);
    both are :class:`~marglik.data.Standardizer` with Bessel's correction (``correction=1``, the
    convention this method has always used; zero input stds are replaced by 1).
    """

    x: Standardizer
    y: Standardizer

    @classmethod
    def fit(cls, x: Tensor, y: Tensor, correction: int = 1) -> Standardisation:
        """Statistics of inputs ``x`` (N, D) and targets ``y`` (any shape, N values)."""
        return cls(
            Standardizer(correction=correction).fit(x),
            Standardizer(correction=correction).fit(y.reshape(-1)),
        )

    @property
    def x_mean(self) -> Tensor:
        """Per-feature input means, (D,)."""
        return self.x.mean

    @property
    def x_std(self) -> Tensor:
        """Per-feature input standard deviations, (D,)."""
        return self.x.std

    @property
    def y_mean(self) -> Tensor:
        """Target mean, 0-dim."""
        return self.y.mean

    @property
    def y_std(self) -> Tensor:
        """Target standard deviation, 0-dim."""
        return self.y.std

    def transform_x(self, x: Tensor) -> Tensor:
        """Standardised inputs: ``x`` (N, D), or (N,) when D = 1; same shape."""
        x = torch.as_tensor(x)
        if x.ndim == 1 and self.x_mean.shape == (1,):
            return self.x.transform(x.unsqueeze(-1)).squeeze(-1)
        return self.x.transform(x)

    def transform_y(self, y: Tensor) -> Tensor:
        """Standardised targets, any shape (elementwise)."""
        y = torch.as_tensor(y)
        return self.y.transform(y.reshape(-1)).reshape(y.shape)


def fit_heteroscedastic(
    x: Tensor,
    y: Tensor,
    hidden: int = 50,
    n_epochs: int = 500,
    lr: float = 1e-2,
    lr_hyp: float = 0.1,
    n_hypersteps: int = 50,
    marglik_frequency: int = 50,
    n_epochs_burnin: int = 50,
    batch_size: int | None = None,
    activation: str = "gelu",
    seed: int = 0,
) -> tuple[Laplace, nn.Module, Standardisation]:
    """Fit a 1×``hidden`` MLP with a NaturalGaussian likelihood by online evidence maximisation.

    Standardises x (per feature) and y, trains with :func:`marglik_training` (KFAC, layer-wise
    prior) and returns ``(la, model, standardisation)``. Predict with
    ``heteroscedastic_predictive(la, s.transform_x(x_new), s.y_mean, s.y_std)``.

    Args:
        x: inputs (N,) or (N, D); y: targets (N,) or (N, 1). The dtype of x is used throughout.
        activation: ``"gelu"`` or ``"tanh"``.
        batch_size: mini-batch size (default: full batch).
        seed: seeds the weight initialisation and the batch order.
    """
    x = torch.as_tensor(x)
    x = x.unsqueeze(-1) if x.ndim == 1 else x
    y = torch.as_tensor(y, dtype=x.dtype).reshape(-1, 1)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need matching x and y with at least 2 rows, got {len(x)} and {len(y)}")
    s = Standardisation.fit(x, y)
    acts = {"gelu": nn.GELU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = mlp([x.shape[1], hidden, 2], acts[activation]).to(x.dtype)
    data = torch.utils.data.TensorDataset(s.transform_x(x), s.transform_y(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size or len(data), shuffle=True,
                                         generator=gen)
    la, model, _ = marglik_training(
        model, loader, NaturalGaussian(), hessian_structure="kron", prior_structure="layerwise",
        n_epochs=n_epochs, lr=lr, lr_hyp=lr_hyp, n_epochs_burnin=n_epochs_burnin,
        marglik_frequency=marglik_frequency, n_hypersteps=n_hypersteps,
    )
    return la, model, s
