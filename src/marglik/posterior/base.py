"""The posterior interface: what predictives, evidence optimisation and training rely on.

A *posterior* approximates p(θ | D) (or, in function space, p(f | D)) around a trained network
and offers (Immer, Korzepa & Bauer, AISTATS 2021; Immer et al., ICML 2021):

- :meth:`Posterior.fit` over a data loader at the network's current weights;
- :meth:`Posterior.log_marginal_likelihood`, differentiable in the prior precision δ, the noise σ
  and, after ``fit(create_graph=True)``, in registered hyperparameters;
- :meth:`Posterior.functional_moments`: the mean and covariance of the linearised network outputs
  f(x) at new inputs, per input (B, D, D) or joint over the batch (B·D, B·D), also chunk by chunk
  (:meth:`Posterior.functional_moment_chunks`);
- :meth:`Posterior.function_samples`: network outputs under posterior samples, (S, B, ...);
- :meth:`Posterior.state_dict` / :meth:`Posterior.load_state_dict`.

:func:`marglik.predictive.predict` (links, noise, the ``la(x)`` call) and
:func:`marglik.evidence.optimize_hyperparameters` use only these members and the public
attributes ``model``, ``likelihood``, ``prior``, ``sigma_noise``, ``dtype`` and ``n_data``, so a new
posterior (weight-space :class:`~marglik.posterior.Laplace`, a function-space GP posterior, ...)
gets the predictive and the evidence optimisation by implementing this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from marglik.evidence.optimize import optimize_hyperparameters
from marglik.likelihoods import Gaussian, Likelihood
from marglik.likelihoods.gaussian import check_sigma
from marglik.posterior.prior import Prior
from marglik.predictive import predict

__all__ = ["Posterior"]


class Posterior(ABC):
    """Abstract posterior around the trained weights of ``model`` under ``likelihood``.

    Attributes:
        model: the user's network (never modified).
        likelihood: a :class:`~marglik.likelihoods.Likelihood`.
        prior: the :class:`~marglik.posterior.prior.Prior` N(μ0, diag(δ)⁻¹).
        n_data: number of training samples seen by :meth:`fit` (0 before).
    """

    model: nn.Module
    likelihood: Likelihood
    prior: Prior
    n_data: int = 0

    # ---- to implement ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load_state_dict`) has run."""

    @abstractmethod
    def fit(self, train_loader: Iterable, progress: bool = False,
            create_graph: bool = False) -> Posterior:
        """Fit the posterior over ``train_loader`` (any iterable of (x, y)); returns ``self``."""

    @abstractmethod
    def log_marginal_likelihood(self, prior_precision: Tensor | None = None,
                                sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D) (0-d), differentiable in ``prior_precision`` and ``sigma_noise``."""

    @abstractmethod
    def functional_moments(self, x: Tensor, joint: bool = False, chunk_size: int | None = None,
                           create_graph: bool = False, backend: str = "auto"
                           ) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the linearised outputs at inputs x (B, ...).

        Returns:
            f (B, ...) and, with ``joint=False``, per-input covariances (B, D, D) of the D
            flattened outputs; with ``joint=True`` the covariance (B·D, B·D), input-major.
            ``create_graph`` keeps the graph to x; ``backend`` picks an implementation where a
            posterior has several (others ignore it); ``chunk_size`` bounds inputs per chunk.
        """

    def functional_moment_chunks(self, x: Tensor, chunk_size: int | None = None,
                                 create_graph: bool = False, backend: str = "auto"
                                 ) -> Iterator[tuple[Tensor, Tensor]]:
        """Per-input moments (f (n, ...), cov (n, D, D)) over consecutive chunks of x.

        The predictive applies its link chunk by chunk, so memory stays bounded for any batch.
        Default: one chunk, :meth:`functional_moments`; posteriors that chunk override it.
        """
        yield self.functional_moments(x, False, chunk_size, create_graph, backend)

    @abstractmethod
    def function_samples(self, x: Tensor, n_samples: int = 100,
                         generator: torch.Generator | None = None,
                         chunk_size: int | None = None) -> Tensor:
        """Network outputs under posterior samples: (n_samples, B, ...) (the "nn" predictive)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Plain tensors and strings, loadable with ``torch.load(weights_only=True)``."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> Posterior:
        """Restore :meth:`state_dict` output; returns ``self``."""

    # ---- shared ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the posterior's computations (default: the model's)."""
        return next(self.model.parameters()).dtype

    def require_fit(self) -> None:
        """Raise a clear error if the posterior is not fitted."""
        if not self.is_fitted:
            raise RuntimeError(
                f"the {type(self).__name__} posterior is not fitted: call fit(train_loader) first"
            )

    @property
    def prior_precision(self) -> Tensor:
        """δ: 0-d, (groups,) or (P,)."""
        return self.prior.precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self.prior.precision = value

    @property
    def prior_mean(self) -> Tensor:
        return self.prior.mean

    @property
    def sigma_noise(self) -> Tensor | None:
        """σ of a Gaussian likelihood, else None."""
        return self.likelihood.sigma if isinstance(self.likelihood, Gaussian) else None

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        if not isinstance(self.likelihood, Gaussian):
            raise ValueError(f"sigma_noise only applies to regression, not {self.likelihood.task}")
        self.likelihood.sigma = check_sigma(value)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_structure: str | None = None,
        tune_sigma: bool = False,
        n_steps: int = 100,
        lr: float = 0.1,
        init_prior_prec: float | Tensor | None = None,
        progress: bool = False,
    ) -> dict[str, list]:
        """Maximise the evidence over δ (and σ) by Adam in log space (:mod:`marglik.evidence`).

        Args:
            method: ``"marglik"`` (the only one).
            prior_structure: ``"scalar" | "layerwise" | "diagonal"``; default keeps δ's shape.
            tune_sigma: also learn σ (regression only, scalar σ).
            n_steps, lr: Adam steps and learning rate.
            init_prior_prec: starting δ (default: the current one, broadcast to the shape).

        Returns:
            history with per-step ``"log_marglik"``, ``"prior_precision"``, ``"sigma_noise"``.
        """
        if method != "marglik":
            raise ValueError(f"unknown method {method!r}: only 'marglik' is available")
        return optimize_hyperparameters(
            self, prior_structure, tune_sigma, n_steps, lr, init_prior_prec, progress
        )

    def __call__(
        self,
        x: Tensor,
        pred_type: str = "glm",
        link_approx: str = "probit",
        joint: bool = False,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        pred_var: bool = False,
        enable_backprop: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior predictive; see :func:`marglik.predictive.predict`.

        Classification returns probabilities (B, C); regression returns (f_mean, f_var) without
        the observation noise, or with it (the predictive variance of y) when ``pred_var=True``.
        ``joint=True`` gives the full covariance over the batch; ``enable_backprop=True`` lets
        gradients flow to x; ``chunk_size`` bounds the inputs processed at once.
        """
        return predict(self, x, pred_type, link_approx, joint, n_samples, generator,
                       pred_var=pred_var, enable_backprop=enable_backprop, chunk_size=chunk_size)
