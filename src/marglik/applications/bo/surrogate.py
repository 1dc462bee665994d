"""The linearised-Laplace BoTorch surrogate (needs ``botorch``: ``pip install marglik[bo]``).

Kristiadi, Immer, Eschenhagen & Fortuin, "Promises and pitfalls of the linearized Laplace in
Bayesian optimization", AABI 2023. A network trained on the observations, its Laplace posterior
N(θ*, Σ) with δ and σ from the evidence, and the GLM predictive as a Gaussian process
(:mod:`marglik.applications.bo.linearised`): for a t-batch X (q, d)

    p(f(X)) = N(μ_y + s_y ⊙ f(X; θ*),  S (J_X Σ J_Xᵀ [+ σ² I]) S),    S = diag(s_y tiled q times),

where μ_y, s_y standardise the observations per output (``standardize=True``). BoTorch's
acquisition functions (EI, LogEI, UCB, qLogEI, …) take it as any other ``Model``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.models.model import Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator import to_linear_operator
from torch import Tensor, nn

from marglik.applications.bo.fitting import FitSettings, check_data, fit_laplace
from marglik.applications.bo.linearised import (
    LinearisedFunctionSamples,
    add_noise,
    check_candidates,
    joint_moments,
    noise_variance,
)
from marglik.posterior.laplace import Laplace


def default_network(d: int, m: int = 1, width: int = 50, depth: int = 2,
                    dtype: torch.dtype = torch.float64) -> nn.Module:
    """The paper's surrogate network: an MLP d → width (ReLU) × depth → m."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else d, m))
    return nn.Sequential(*layers).to(dtype)


def standardisation(Y: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Per-output location μ_y (m,) and scale s_y (m,) of Y (n, m) (0 and 1 if not asked)."""
    if not standardize:
        return Y.new_zeros(Y.shape[-1]), Y.new_ones(Y.shape[-1])
    scale = Y.std(0) if Y.shape[0] > 1 else Y.new_ones(Y.shape[-1])
    return Y.mean(0), torch.where(scale > 1e-8, scale, torch.ones_like(scale))


def untransform_moments(mean: Tensor, cov: Tensor, loc: Tensor, scale: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """mean (..., q, m), cov (..., q·m, q·m) from standardised to original units."""
    q = mean.shape[-2]
    s = scale.to(cov).repeat(q)
    return loc.to(mean) + scale.to(mean) * mean, cov * s[:, None] * s[None, :]


def output_subset(mean: Tensor, cov: Tensor, idx: list[int]) -> tuple[Tensor, Tensor]:
    """Moments of outputs ``idx`` only: mean (..., q, k), cov (..., q·k, q·k)."""
    q, m = mean.shape[-2:]
    rows = (torch.arange(q)[:, None] * m + torch.as_tensor(idx)[None, :]).reshape(-1)
    return mean[..., idx], cov[..., rows[:, None], rows[None, :]]


class LaplaceSurrogate(Model):
    """BoTorch ``Model``: the linearised Laplace of a network as a Gaussian process.

    Args:
        train_X: inputs (n, d) (scale them to the unit cube, as for any BoTorch model).
        train_Y: observations (n, m) to be maximised.
        net: the network (copied; the given module is left as it was). Default
            :func:`default_network` (d → 50 → 50 → m, ReLU, float64).
        settings: training and evidence tuning (:class:`~marglik.applications.bo.FitSettings`);
            keyword arguments override its fields, e.g. ``tuning="online"``, ``noise_std=0.01``.
        standardize: fit the network to per-output standardised Y and map the posterior back.
        seed: seeds the default network's initialisation.

    After construction the model holds the trained network ``net`` and the evidence-tuned
    posterior ``laplace`` (a :class:`~marglik.Laplace` over all weights).
    """

    def __init__(self, train_X: Tensor, train_Y: Tensor, net: nn.Module | None = None, *,
                 settings: FitSettings | None = None, standardize: bool = True, seed: int = 0,
                 **overrides: Any):
        super().__init__()
        train_X, train_Y = check_data(train_X, train_Y)
        if net is None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = default_network(train_X.shape[-1], train_Y.shape[-1])
        elif not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        else:
            net = copy.deepcopy(net)
        settings = copy.deepcopy(settings) if settings is not None else FitSettings()
        for key, value in overrides.items():
            if not hasattr(settings, key):
                raise TypeError(f"unknown setting {key!r}: see FitSettings")
            setattr(settings, key, value)
        settings.__post_init__()
        self.settings, self.standardize, self.seed = settings, standardize, seed
        self.net = net
        self._fit(train_X, train_Y, settings.prior_precision, settings.sigma_init,
                  settings.n_epochs)

    def _fit(self, X: Tensor, Y: Tensor, prior_precision: Tensor | float,
             sigma: Tensor | float, n_epochs: int) -> None:
        dtype = next(self.net.parameters()).dtype
        self.train_inputs, self.train_targets = X, Y
        loc, scale = standardisation(Y.to(dtype), self.standardize)
        self.y_loc, self.y_scale = loc, scale
        Xt, Yt = X.to(dtype), (Y.to(dtype) - loc) / scale
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.laplace: Laplace = fit_laplace(self.net, Xt, Yt, self.settings,
                                                prior_precision, sigma, n_epochs)
        self.net.eval()

    # ---- the BoTorch interface ------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self.train_targets.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size([])

    def posterior(self, X: Tensor, output_indices: list[int] | None = None,
                  observation_noise: bool | Tensor = False,
                  posterior_transform: PosteriorTransform | None = None,
                  **kwargs: Any) -> GPyTorchPosterior:
        """Joint predictive over the q points of each t-batch of X (..., q, d).

        Mean (..., q, m) and covariance (..., q·m, q·m) of f(X), or of y with
        ``observation_noise=True`` (adds σ² per output, learned or fixed); differentiable in X.
        """
        X = check_candidates(X, self.train_inputs.shape[-1])
        if isinstance(observation_noise, Tensor):
            raise TypeError("observation_noise must be True or False: the surrogate's noise "
                            "is its own σ (learned by the evidence or fixed by noise_std)")
        mean, cov = joint_moments(self.laplace, X)
        if observation_noise:
            q, m = mean.shape[-2:]
            cov = add_noise(cov, noise_variance(self.laplace, m).repeat(q))
        mean, cov = untransform_moments(mean, cov, self.y_loc, self.y_scale)
        if output_indices is not None:
            bad = [i for i in output_indices if not 0 <= i < self.num_outputs]
            if bad:
                raise ValueError(f"output_indices {bad} out of range for "
                                 f"{self.num_outputs} outputs")
            mean, cov = output_subset(mean, cov, list(output_indices))
        # lazy: J Σ Jᵀ over more points than weights is singular; gpytorch factorises a
        # linear operator only when sampling, with its jittered psd_safe_cholesky
        cov = to_linear_operator(cov)
        if mean.shape[-1] == 1:
            mvn = MultivariateNormal(mean[..., 0], cov)
        else:
            mvn = MultitaskMultivariateNormal(mean, cov, interleaved=True)
        post = GPyTorchPosterior(mvn)
        return posterior_transform(post) if posterior_transform is not None else post

    def condition_on_observations(self, X: Tensor, Y: Tensor, **kwargs: Any) -> LaplaceSurrogate:
        """A new surrogate on the old and new observations, warm-started from this one.

        The network starts from the current weights and δ, σ from their evidence-tuned
        values; it trains ``settings.n_epochs_refit`` steps on all observations (the output
        standardisation is recomputed over them). This model is left unchanged.
        X (k, d), Y (k, m) in the original units (batched fantasies are not supported).
        """
        X, Y = check_data(X, Y)
        if X.shape[-1] != self.train_inputs.shape[-1] or Y.shape[-1] != self.num_outputs:
            raise ValueError(f"new observations must have {self.train_inputs.shape[-1]} "
                             f"features and {self.num_outputs} outputs, got X "
                             f"{tuple(X.shape)} and Y {tuple(Y.shape)}")
        new = type(self).__new__(type(self))
        Model.__init__(new)
        new.settings = copy.deepcopy(self.settings)
        new.standardize, new.seed = self.standardize, self.seed
        new.net = copy.deepcopy(self.net)
        sigma = self.laplace.sigma_noise
        new._fit(torch.cat([self.train_inputs, X.to(self.train_inputs)]),
                 torch.cat([self.train_targets, Y.to(self.train_targets)]),
                 self.laplace.prior_precision, sigma, self.settings.n_epochs_refit)
        return new

    # ---- Thompson sampling ------------------------------------------------------------------
    def function_samples(self, n_samples: int,
                         generator: torch.Generator | None = None) -> StandardisedSamples:
        """S functions drawn from the linearised posterior (see
        :class:`~marglik.applications.bo.linearised.LinearisedFunctionSamples`), in the
        original output units: a module with ``forward(X (..., d)) → (S, ..., m)`` and
        ``paired(X (..., S, d)) → (..., S, m)``."""
        return StandardisedSamples(LinearisedFunctionSamples(self.laplace, n_samples, generator),
                                   self.y_loc, self.y_scale)


class StandardisedSamples(nn.Module):
    """Linearised function samples mapped back to the original output units."""

    def __init__(self, samples: LinearisedFunctionSamples, loc: Tensor, scale: Tensor):
        super().__init__()
        self.samples, self.loc, self.scale = samples, loc, scale
        self.n_samples = samples.n_samples

    def forward(self, X: Tensor) -> Tensor:
        """X (..., d) → (S, ..., m)."""
        return self.loc + self.scale * self.samples(X)

    def paired(self, X: Tensor) -> Tensor:
        """X (..., S, d) → (..., S, m), sample s at X[..., s, :]."""
        return self.loc + self.scale * self.samples.paired(X)
