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

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from marglik.curvature.engine import eval_mode
from marglik.evidence.optimize import optimize_hyperparameters
from marglik.likelihoods import Gaussian, Likelihood, get_likelihood
from marglik.likelihoods.gaussian import check_sigma
from marglik.posterior.prior import Prior, as_model_dtype
from marglik.posterior.tangent import optimize_tangent_evidence
from marglik.predictive import predict
from marglik.predictive.links import centre_covariance
from marglik.predictive.validation import gridsearch_prior_precision

__all__ = ["Posterior"]


class Posterior(ABC):
    """Abstract posterior around the trained weights of ``model`` under ``likelihood``.

    Attributes:
        model: the user's network (never modified).
        likelihood: a :class:`~marglik.likelihoods.Likelihood`.
        prior: the :class:`~marglik.posterior.prior.Prior` N(μ0, diag(δ)⁻¹).
        n_data: number of training samples seen by :meth:`fit` (0 before).
        train_loader: the data of the last :meth:`fit` when they can be iterated again (a
            ``DataLoader``, a list), for evidence methods that pass over the data again
            (:meth:`optimize_prior_precision`'s default); ``None`` for a one-shot iterator or
            a posterior loaded from a ``state_dict``. Not saved.
    """

    model: nn.Module
    likelihood: Likelihood
    prior: Prior
    n_data: int = 0
    train_loader: Iterable | None = None

    # ---- shared set-up --------------------------------------------------------------------------
    def _init_model(self, model: nn.Module, likelihood: str | Likelihood,
                    sigma_noise: float | Tensor, temperature: float) -> None:
        """Set ``model``, ``likelihood`` (with σ) and ``temperature`` T, checked.

        A σ other than the default 1.0 raises for a non-Gaussian likelihood and is applied to a
        given Likelihood object (never silently ignored).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = get_likelihood(likelihood, as_model_dtype(sigma_noise, model))
        sigma_given = not (isinstance(sigma_noise, (int, float)) and sigma_noise == 1.0)
        if sigma_given and not isinstance(self.likelihood, Gaussian):
            raise ValueError(f"sigma_noise only applies to regression, not {self.likelihood.task}")
        if sigma_given and isinstance(likelihood, Likelihood):
            self.sigma_noise = sigma_noise
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                0 < temperature < math.inf):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature)

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
        """log p(D) (0-d), differentiable in ``prior_precision`` and ``sigma_noise``.

        Values passed are kept (detached) as the posterior's ``prior_precision`` and
        ``sigma_noise``, as laplace-torch does, so predictions use the last evaluated ones.
        """

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
                                 create_graph: bool = False, backend: str = "auto",
                                 centred: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Per-input moments (f (n, ...), cov (n, D, D)) over consecutive chunks of x.

        The predictive applies its link chunk by chunk, so memory stays bounded for any batch.
        Default: one chunk, :meth:`functional_moments`; posteriors that chunk override it.
        ``centred``: for outputs (B, C), cov may be that of the centred logits, P Σ P with
        P = I − 11ᵀ/C (what every softmax link reads; a posterior may then need only C − 1
        output columns); outputs with more dimensions keep Σ.
        """
        f, cov = self.functional_moments(x, False, chunk_size, create_graph, backend)
        yield f, (centre_covariance(cov) if centred and f.ndim == 2 else cov)

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

    def _keep(self, prior_precision: Any, sigma_noise: Any) -> None:
        """Keep hyperparameters just evaluated by ``log_marginal_likelihood``, detached copies."""
        if prior_precision is not None:
            self.prior_precision = (prior_precision.detach().clone()
                                    if torch.is_tensor(prior_precision) else prior_precision)
        if sigma_noise is not None:
            self.sigma_noise = (sigma_noise.detach().clone()
                                if torch.is_tensor(sigma_noise) else sigma_noise)

    @property
    def prior_precision(self) -> Tensor:
        """δ: 0-d, (groups,) or (P,)."""
        return self.prior.precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self.prior.precision = as_model_dtype(value, self.model)

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
        self.likelihood.sigma = check_sigma(as_model_dtype(value, self.model))

    def optimize_prior_precision(
        self,
        method: str | None = None,
        prior_structure: str | None = None,
        tune_sigma: bool = False,
        n_steps: int = 100,
        lr: float = 0.1,
        init_prior_prec: float | Tensor | None = None,
        progress: bool = False,
        *,
        pred_type: str = "glm",
        val_loader: Iterable | None = None,
        loss: Callable[..., Any] | None = None,
        log_prior_prec_min: float = -4.0,
        log_prior_prec_max: float = 4.0,
        grid_size: int = 100,
        link_approx: str = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        train_loader: Iterable | None = None,
        optimizer: str | None = None,
        tangent_search: str = "scales",
    ) -> dict[str, list]:
        """Tune δ (and σ) post hoc: by the evidence (``"tangent"``, ``"marglik"``) or validation.

        The default is ``"tangent"`` on the data of :meth:`fit` for a weight-space Laplace
        posterior that holds them (:attr:`train_loader`), else ``"marglik"``. laplace-torch's
        default is ``"marglik"``: the evidence at the network's weights, which picks a δ far too
        small for a trained network and an underconfident predictive (test NLL 2–3× the
        network's on digits, σ near the targets' whole spread on UCI regression;
        ``docs/calibration.md`` §6–7); pass ``method="marglik"`` for it.

        ``"marglik"`` maximises the evidence over δ (and σ) by Adam in log space
        (:mod:`marglik.evidence`). ``"gridsearch"`` (laplace-torch's) tries the scalar δ
        ``torch.logspace(log_prior_prec_min, log_prior_prec_max, grid_size)`` (base 10) and keeps
        the one whose predictive ``la(x, pred_type, link_approx, n_samples)`` has the lowest
        ``loss`` on ``val_loader``; δ where the posterior cannot be formed count as +inf.
        ``"tangent"`` maximises the evidence of the tangent model h(x) = J(x; θ*) t at its own
        mode t* rather than at the network's weights θ* (Antorán et al., ICML 2022;
        :mod:`marglik.posterior.tangent`), refitting the curvature at h* on ``train_loader``
        in each round; afterwards the posterior holds that fit (``la.tangent`` is t*).

        Args:
            method: ``"tangent"``, ``"marglik"`` or ``"gridsearch"``; default (``None``):
                ``"tangent"`` when it applies (above), else ``"marglik"`` (with a warning for a
                weight-space posterior without its training data).
            prior_structure: ``"scalar" | "layerwise" | "diagonal"`` (``"diag"`` too); default
                keeps δ's shape. Grid search searches a scalar δ.
            tune_sigma: also learn σ (regression only, scalar σ; ``"marglik"`` only).
            n_steps, lr: Adam steps and learning rate (``optimizer="lbfgs"``: the most
                evaluations of the evidence; ``lr`` unused).
            optimizer: for ``"marglik"``, ``"adam"`` (default, laplace-torch's) or
                ``"lbfgs"``: L-BFGS runs to the evidence optimum (gradient at rounding level) in
                few evaluations; use it where an evaluation is expensive (a full posterior with a
                layer-wise or per-parameter δ factorises P each time). See
                :func:`marglik.evidence.optimize_hyperparameters`. ``"tangent"`` always uses
                L-BFGS in its rounds; grid search takes none.
            init_prior_prec: starting δ (default: the current one, broadcast to the shape).
            progress, progress_bar: show a progress bar.
            pred_type, link_approx, n_samples: the predictive scored by grid search (ignored by
                ``"marglik"``, as in laplace-torch).
            val_loader: validation batches (x, y) for grid search.
            train_loader: the training batches for ``"tangent"`` (re-iterable; the data of
                :meth:`fit`, the default). ``n_steps`` is then the most evidence evaluations
                (L-BFGS) per round.
            tangent_search: where ``"tangent"`` seeks the tangent model's mode:
                ``"scales"`` (t = Σ_k c_k θ*_k over θ*'s K tensors; K forward-mode passes, then
                a curvature fit per round) or ``"full"`` (all of t; 60–120 passes per round); see
                :func:`marglik.posterior.tangent.optimize_tangent_evidence`.
            loss: validation loss for grid search, lower is better. Default: the mean negative
                log predictive density — categorical / Bernoulli for classification, Gaussian
                with covariance f_var + σ²I for regression (laplace-torch scores regression by
                MSE, which the GLM predictive's mean does not depend on). A callable gets the
                whole validation set, ``loss(probs, y)`` for classification and
                ``loss(f_mean, f_var, y)`` (f_var without σ²) for regression; an object with
                ``reset``/``update``/``compute`` (a torchmetrics ``Metric``) is updated batch by
                batch as in laplace-torch.
            log_prior_prec_min, log_prior_prec_max, grid_size: the grid (log10 δ).
            verbose: print the chosen δ.

        Returns:
            ``"marglik"``: per-step ``"log_marglik"``, ``"prior_precision"``, ``"sigma_noise"``;
            ``"gridsearch"``: per grid point ``"prior_precision"`` and ``"loss"``.
        """
        progress = progress or progress_bar
        if prior_structure == "diag":  # laplace-torch's name
            prior_structure = "diagonal"
        if train_loader is None and method in (None, "tangent"):
            train_loader = self.train_loader
        if method is None:
            method = self._default_evidence(train_loader)
        if val_loader is not None and method in ("marglik", "tangent"):
            warnings.warn(
                f"val_loader is ignored by method={method!r}: did you mean method='gridsearch'?",
                stacklevel=2,
            )
        if method == "marglik":
            history = optimize_hyperparameters(
                self, prior_structure, tune_sigma, n_steps, lr, init_prior_prec, progress,
                optimizer or "adam",
            )
        elif method == "tangent":
            if optimizer not in (None, "lbfgs"):
                raise ValueError(f"method='tangent' maximises the evidence of each round by "
                                 f"L-BFGS; optimizer={optimizer!r} is not available")
            if train_loader is None:
                raise ValueError("method='tangent' needs the training data: train_loader=... "
                                 "(this posterior holds none: loaded from a state_dict, or "
                                 "fitted on a one-shot iterator)")
            if not hasattr(self, "tangent"):
                raise ValueError(f"method='tangent' needs a weight-space Laplace posterior, not "
                                 f"{type(self).__name__}")
            history = optimize_tangent_evidence(
                self, train_loader, prior_structure, tune_sigma, n_steps, lr, init_prior_prec,
                progress=progress, search=tangent_search,
            )
        elif method == "gridsearch":
            if optimizer is not None:
                raise ValueError("method='gridsearch' tries a grid: it takes no optimizer")
            if val_loader is None:
                raise ValueError("method='gridsearch' needs a validation loader: val_loader=...")
            if tune_sigma:
                raise ValueError("tune_sigma needs method='marglik'")
            if prior_structure not in (None, "scalar"):
                raise ValueError(
                    f"method='gridsearch' searches a scalar prior precision, not "
                    f"prior_structure={prior_structure!r}"
                )
            if not isinstance(grid_size, int) or grid_size < 1:
                raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
            history = gridsearch_prior_precision(
                self, val_loader, loss, log_prior_prec_min, log_prior_prec_max, grid_size,
                pred_type, link_approx, n_samples, progress,
            )
        else:
            hint = (
                " (pred_type is a keyword here: optimize_prior_precision(pred_type=...))"
                if method in ("glm", "nn") else ""
            )
            raise ValueError(
                f"unknown method {method!r}: use 'marglik', 'tangent' or 'gridsearch'{hint}"
            )
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")
        return history

    def _default_evidence(self, train_loader: Iterable | None) -> str:
        """``optimize_prior_precision``'s default method: the tangent evidence where it applies."""
        if not hasattr(self, "tangent"):  # not a weight-space Laplace posterior
            return "marglik"
        if train_loader is None:
            warnings.warn(
                "optimize_prior_precision() maximises the tangent evidence on the training data, "
                "which this posterior does not hold (loaded from a state_dict, or fitted on a "
                "one-shot iterator): using the evidence at the network's weights "
                "(method='marglik'), which is underconfident for trained networks; pass "
                "train_loader=... for the default",
                stacklevel=3,
            )
            return "marglik"
        return "tangent"
    def predictive_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the predictive's mean parameter, (n_samples, B, ...) (laplace-torch's).

        :meth:`functional_samples` with the inverse link applied: softmax probabilities for
        classification, sigmoid for binary, the outputs f themselves (no observation noise) for
        regression.
        """
        f = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        if self.likelihood.task == "classification":
            return torch.softmax(f, -1)
        if self.likelihood.task == "binary":
            return torch.sigmoid(f)
        return f

    def functional_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the network outputs f(x), (n_samples, B, ...) (laplace-torch's).

        ``pred_type="glm"`` samples the linearised outputs N(f(x; θ*), J Σ Jᵀ) per input (with
        ``diagonal_output`` only their marginal variances); ``"nn"`` runs the network at
        θ ~ q(θ) (:meth:`function_samples`).
        """
        if pred_type not in ("glm", "nn"):
            raise ValueError(f"unknown pred_type {pred_type!r}: use 'glm' or 'nn'")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        self.require_fit()
        if pred_type == "nn":
            return self.function_samples(x, n_samples, generator)
        with eval_mode(self.model), torch.no_grad():
            out = []
            for f, cov in self.functional_moment_chunks(x):
                B, D = f.shape[0], cov.shape[-1]
                eps = torch.randn(n_samples, B, D, generator=generator, dtype=cov.dtype,
                                  device=cov.device)
                if diagonal_output:
                    noise = eps * cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
                else:  # a symmetric square root, valid for singular covariances too
                    evals, evecs = torch.linalg.eigh(cov)
                    root = evecs * evals.clamp_min(0).sqrt()[..., None, :]
                    noise = torch.einsum("bij,sbj->sbi", root, eps)
                out.append(f.detach() + noise.reshape(n_samples, *f.shape).to(f))
        return torch.cat(out, dim=1)

    def __call__(
        self,
        x: Tensor,
        pred_type: str = "glm",
        link_approx: str | None = None,
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
        ``link_approx`` (default ``"probit"``) applies to classification; regression has no
        link, so a ``link_approx`` given for it is ignored (as in laplace-torch) with a warning.
        """
        if link_approx is None:
            link_approx = "probit"
        elif self.likelihood.task not in ("classification", "binary") and not (
            pred_type == "nn" and link_approx == "mc"  # laplace-torch asks for it with "nn"
        ):
            warnings.warn(
                f"link_approx={link_approx!r} is ignored for a {self.likelihood.task} "
                "likelihood: it has no link; the predictive is (f_mean, f_var)",
                stacklevel=2,
            )
        return predict(self, x, pred_type, link_approx, joint, n_samples, generator,
                       pred_var=pred_var, enable_backprop=enable_backprop, chunk_size=chunk_size)
