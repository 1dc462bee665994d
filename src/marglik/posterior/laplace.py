"""The Laplace posterior q(θ) = N(θ*, (H/T + P0)⁻¹) over all weights, the last layer or a subset.

Daxberger et al., "Laplace Redux", NeurIPS 2021; Immer et al., ICML 2021. One class composed of
parts — a :class:`~marglik.curvature.subsets.ParameterSubset`, a likelihood, and a curvature
:class:`~marglik.structures.BlockDiagonal` — instead of a class per subset × structure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from marglik.curvature.engine import Curvature, batches, eval_mode, fit_curvature
from marglik.curvature.runtime import preserved
from marglik.curvature.subsets import (
    ParameterSubset,
    find_last_layer,
    own_parameter_names,
    select_subset,
)
from marglik.evidence.laplace import laplace_log_evidence
from marglik.likelihoods import Likelihood
from marglik.likelihoods.gaussian import check_sigma
from marglik.posterior.base import Posterior
from marglik.posterior.glm import glm_moment_chunks, glm_moments
from marglik.posterior.prior import Prior, as_model_dtype, check_precision
from marglik.posterior.samples import sample_outputs
from marglik.posterior.state import laplace_state, load_laplace_state
from marglik.posterior.tangent_model import tangent_outputs
from marglik.structures import BlockDiagonal

__all__ = ["Laplace"]


class Laplace(Posterior):
    """Laplace approximation around the trained weights θ* of ``model``.

    Args:
        model: a trained ``nn.Module``; it is left exactly as it was: every forward pass runs
            in eval mode and restores train/eval flags, ``requires_grad`` flags, buffers
            (BatchNorm statistics) and hooks (:func:`~marglik.curvature.runtime.preserved`).
        likelihood: ``"regression"`` (Gaussian), ``"classification"`` (softmax), ``"binary"``
            (Bernoulli) or a :class:`~marglik.likelihoods.Likelihood`.
        subset_of_weights: ``"all" | "last_layer" | "subnetwork" | "requires_grad"``. ``"all"``
            means the parameters with ``requires_grad=True`` (as in laplace-torch ≥ 0.2; every
            parameter if none requires grad); ``"last_layer"`` the own parameters of the last
            module other than the model itself that runs and owns parameters
            (:func:`~marglik.curvature.subsets.find_last_layer`; found in :meth:`fit` and kept
            in ``last_layer_name``). See ``docs/from-laplace-torch.md``.
        hessian_structure: ``"kron" | "full" | "diag" | "lowrank" | "kernel"``. ``"kernel"``
            is the exact GGN kept as its N·C rows (the function-space form: rank ≤ N·C,
            O(P·(NC)²) operations and N·C·P memory; exact like ``"full"`` when the data have
            fewer outputs than the model parameters); see
            :class:`~marglik.curvature.low_rank.KernelAccumulator`.
        curvature: ``"ggn" | "ef" | "ggn-mc" | "ggn-sampled"``: exact GGN, empirical Fisher,
            Monte Carlo Fisher (sampled targets) or sampled columns of Λ's factor (one
            backward pass per column instead of C; unbiased for the GGN, variance in
            :mod:`marglik.curvature.columns`).
        kfac_approx: ``"expand" | "reduce"`` for weight-sharing layers.
        prior_precision: δ > 0: a scalar, one value per parameter tensor of the subset
            ("layer-wise", in ``named_parameters()`` order) or one per parameter.
        sigma_noise: σ of the Gaussian likelihood (regression only), scalar or one per output;
            given with a :class:`~marglik.likelihoods.Gaussian` object, it replaces that σ.
        temperature: T; the posterior precision is H/T + P0.
        prior_mean: μ0, a scalar or one value per parameter.
        prior_groups: parameter-tensor names per prior group (e.g. all tensors of one
            subnetwork); a per-group ``prior_precision`` then has one value per group. Default:
            each tensor is its own group ("layer-wise"). See :class:`~marglik.posterior.Prior`.
        subnetwork: module or parameter names, a boolean mask or flat indices for
            ``"subnetwork"``.
        last_layer_name: module name of the last layer (default: found by running the model).
        rank: number of eigenpairs for ``"lowrank"``.
        mc_samples: sampled columns per input for ``"ggn-mc"`` and ``"ggn-sampled"``.
        seed: seed for Monte Carlo curvature and Lanczos.
        dict_key_x, dict_key_y: as in laplace-torch, for data loaders yielding dicts (or
            ``UserDict`` / ``BatchEncoding``): the whole dict is the model input, the targets are
            ``batch[dict_key_y]`` and the batch size is ``batch[dict_key_x].shape[0]``. Loaders
            may also yield (x, y) pairs with x a tensor, a dict of tensors (``model(x)``) or a
            tuple of tensors (``model(*x)``); ``la(x)`` takes the same kinds of x. See
            :mod:`marglik.curvature.batches`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        subset_of_weights: str = "all",
        hessian_structure: str = "kron",
        curvature: str = "ggn",
        kfac_approx: str = "expand",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        prior_mean: float | Tensor = 0.0,
        subnetwork: list[str] | Tensor | None = None,
        last_layer_name: str | None = None,
        rank: int | None = None,
        mc_samples: int = 1,
        seed: int = 0,
        prior_groups: list[list[str]] | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ):
        self._init_model(model, likelihood, sigma_noise, temperature)
        self.subset_of_weights = subset_of_weights
        self.hessian_structure = hessian_structure
        self.curvature = curvature
        self.kfac_approx = kfac_approx
        self.rank, self.mc_samples, self.seed = rank, mc_samples, seed
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.prior = Prior(
            as_model_dtype(prior_precision, model),
            torch.as_tensor(prior_mean, dtype=self._param_dtype), prior_groups,
        )
        self.subset: ParameterSubset | None = None
        # checked by load_state_dict with subset_of_weights; filled in when fit() finds it
        self.last_layer_name = last_layer_name
        if subset_of_weights != "last_layer" or last_layer_name is not None:
            self._set_subset(select_subset(model, subset_of_weights, subnetwork, last_layer_name))
        self.mean: Tensor | None = None
        self.H: BlockDiagonal | None = None
        self.statistics: dict[str, Tensor] = {}
        self.n_data = 0
        #: t of a fit of the tangent model (``fit(tangent=t)``), else None
        self.tangent: Tensor | None = None
        self._sigma_fit: Tensor | None = None

    def _set_subset(self, subset: ParameterSubset) -> None:
        self.subset = subset
        self.prior.bind(subset.names, subset.numel_per_tensor)

    # ---- fitting ------------------------------------------------------------------------------
    def fit(
        self, train_loader: Iterable, progress: bool = False, create_graph: bool = False,
        tangent: Tensor | None = None,
    ) -> Laplace:
        """Fit the curvature over ``train_loader`` (any iterable of (x, y)) at the current weights.

        Under an initialised ``torch.distributed`` process group the statistics of all ranks are
        summed, so each rank passes its own shard of the data.

        With ``create_graph=True`` the curvature and the data fit keep their autograd graph to
        the tensors the forward pass (or the likelihood) uses besides the posterior's own
        weights, which are held at their values: :meth:`log_marginal_likelihood` is then
        differentiable in such hyperparameters (e.g. a learned input transformation whose
        parameters are left out of the subset), through log p(D|θ*, h) and log det(H(h)/T + P0).
        Take gradients with ``torch.autograd.grad(log_z, hyperparameters)``; the graph also
        reaches the weights. Exact GGN with ``"full"``, ``"diag"`` or ``"kron"`` only; see
        :func:`~marglik.curvature.engine.fit_curvature` for the cost.

        With ``tangent=t`` (P,) the approximation is of the tangent model h(x) = J(x; θ*) t at t
        (:mod:`marglik.posterior.tangent`): curvature Jᵀ Λ(h) J and data fit log p(y | h) at its
        outputs, prior term at t; the predictive keeps the network's mean f(x; θ*).
        ``optimize_prior_precision(method="tangent")`` finds t as the tangent model's mode.
        """
        with preserved(self.model):  # buffers saved once per fit, whatever runs inside
            if self.subset is None:  # last layer found from the first batch
                first = next(iter(train_loader), None)
                if first is None:
                    raise ValueError("the data loader is empty")
                x, _ = next(batches([first], self.model, self.dict_key_x, self.dict_key_y))
                self.last_layer_name = find_last_layer(self.model, x)
                own = own_parameter_names(self.model, self.last_layer_name)
                self._set_subset(select_subset(self.model, "subnetwork", own))
            outputs = None
            if tangent is not None:
                tangent = self._check_tangent(tangent)
                outputs = tangent_outputs(self.model, self.subset, tangent)
            curv: Curvature = fit_curvature(
                self.model,
                self.likelihood,
                train_loader,
                self.subset,
                self.hessian_structure,
                self.curvature,
                self.kfac_approx,
                self.rank,
                self.mc_samples,
                self.seed,
                progress,
                create_graph=create_graph,
                dict_key_x=self.dict_key_x,
                dict_key_y=self.dict_key_y,
                outputs=outputs,
            )
        self.H, self.statistics, self.n_data = curv.structure, curv.statistics, curv.n_data
        self.train_loader = None if isinstance(train_loader, Iterator) else train_loader
        self.mean = self.subset.vector(self.model)
        self.tangent = None if tangent is None else tangent.detach().clone()
        self._sigma_fit = (
            self.sigma_noise.detach().clone() if self.sigma_noise is not None else None
        )
        return self

    def _check_tangent(self, tangent: Tensor) -> Tensor:
        """``tangent`` as a (P,) vector on the model's device and dtype, or a clear error."""
        tangent = torch.as_tensor(tangent)
        if tangent.shape != (self.subset.size,):
            raise ValueError(f"tangent must have shape ({self.subset.size},), one value per "
                             f"posterior parameter, got {tuple(tangent.shape)}")
        if not torch.isfinite(tangent).all():
            raise ValueError("tangent contains NaN/inf values")
        param = next(self.model.parameters())
        return tangent.detach().to(device=param.device, dtype=self._param_dtype)

    @property
    def is_fitted(self) -> bool:
        return self.H is not None

    def _require_fit(self) -> None:  # kept for code written against earlier releases
        self.require_fit()

    # ---- hyperparameters ----------------------------------------------------------------------
    @property
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the curvature (at least float32), else of the model."""
        return self.H.dtype if self.H is not None else self._param_dtype

    @property
    def n_params(self) -> int:
        """Number of parameters P in the posterior."""
        if self.subset is None:
            raise RuntimeError("the last layer is found during fit(): call fit() first")
        return self.subset.size

    def expand_prior(self, prior_precision: Tensor) -> Tensor:
        """δ as 0-d (scalar) or per parameter (P,), from scalar / per-group / per-parameter."""
        return self.prior.expand(check_precision(prior_precision))

    def _scale(self, sigma_noise: Tensor | None) -> Tensor:
        """Factor multiplying the fitted H: (σ_fit/σ)²/T for regression, 1/T otherwise."""
        scale = torch.tensor(1.0 / self.temperature, dtype=self.H.dtype, device=self.H.device)
        if self._sigma_fit is None:
            if sigma_noise is not None:
                raise ValueError(
                    f"sigma_noise only applies to regression, not {self.likelihood.task}"
                )
            return scale
        sigma = self.sigma_noise if sigma_noise is None else check_sigma(sigma_noise)
        ratio = self._sigma_fit.to(scale) / sigma.to(scale)
        if ratio.numel() > 1:
            if not torch.equal(sigma.detach().to(scale), self._sigma_fit.to(scale)):
                raise ValueError(
                    "a per-output sigma_noise cannot change after fit(): refit instead"
                )
            return scale
        return scale * ratio.reshape(()) ** 2

    def _delta(self, prior_precision: Tensor | None) -> Tensor:
        """δ (given or current), checked, on the curvature's device and dtype."""
        delta = self.prior.precision if prior_precision is None else prior_precision
        return check_precision(delta).to(self.H.device, self.H.dtype)

    # ---- evidence -----------------------------------------------------------------------------
    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D | θ*) of the training data (0-d)."""
        self.require_fit()
        if sigma_noise is None and self.sigma_noise is not None:
            sigma_noise = self.sigma_noise
        elif sigma_noise is not None:  # a Python float too, as the other hyperparameter inputs
            sigma_noise = check_sigma(sigma_noise)
        return self.likelihood.log_lik_from_statistics(self.statistics, sigma_noise)

    def log_det_ratio(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """log det P − log det P0 (0-d)."""
        self.require_fit()
        delta = self._delta(prior_precision)
        scale = self._scale(sigma_noise)
        if self.prior.kind(delta) == "group":  # one δ per block where a block is in one group
            logdet = self.H.logdet_per_block(scale, self.prior.per_block(self.H.offsets, delta))
        else:
            logdet = self.H.logdet(scale, self.prior.expand(delta))
        return logdet - self.prior.log_det(delta)

    @property
    def prior_precision_diag(self) -> Tensor:
        """δ for every parameter, (P,) (laplace-torch's ``prior_precision_diag``)."""
        delta = self.prior.expand(check_precision(self.prior.precision))
        return delta.expand(self.n_params) if delta.ndim == 0 else delta

    @property
    def log_det_prior_precision(self) -> Tensor:
        """log det P0 (0-d; a property as in laplace-torch)."""
        return self.prior.log_det()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """log det P (0-d; a property as in laplace-torch)."""
        return self.log_det_ratio() + self.log_det_prior_precision.to(self.H.dtype)

    def scatter(self, prior_precision: Tensor | None = None) -> Tensor:
        """(θ* − μ0)ᵀ P0 (θ* − μ0) (0-d); at t for a fit of the tangent model."""
        self.require_fit()
        delta = self.prior.precision if prior_precision is None else prior_precision
        point = self.mean if self.tangent is None else self.tangent
        return self.prior.scatter(point, check_precision(delta))

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace evidence log Z = log p(D|θ*) − ½ (θ*−μ0)ᵀP0(θ*−μ0) − ½ (log det P − log det P0).

        Differentiable in ``prior_precision`` and ``sigma_noise`` (which default to the current
        values); the curvature is not refitted: for regression H scales as (σ_fit/σ)².

        As in laplace-torch, values passed here are kept: afterwards ``prior_precision`` and
        ``sigma_noise`` hold detached copies of them, so ``la(x)``, :meth:`sample` and the other
        methods use the hyperparameters last evaluated (e.g. after a user's Adam loop on
        log δ and log σ). The returned value keeps its graph to the tensors passed; the stored
        copies carry none. A one-element δ of shape (1,) is a scalar. Values that raise an
        error are not kept.
        """
        value = laplace_log_evidence(
            self.log_likelihood(sigma_noise),
            self.scatter(prior_precision),
            self.log_det_ratio(prior_precision, sigma_noise),
        )
        self._keep(prior_precision, sigma_noise)
        return value

    # ---- the Gaussian posterior ---------------------------------------------------------------
    def _precision_args(self) -> tuple[Tensor, Tensor]:
        """(scale, δ as 0-d or (P,)) of P = scale · H + diag(δ)."""
        self.require_fit()
        return self._scale(None), self.prior.expand(self._delta(None))

    @property
    def posterior_precision(self) -> Tensor:
        """Dense P = H/T + P0, (P, P) — for tests and small models only."""
        scale, delta = self._precision_args()
        return self.H.precision_dense(scale, delta)

    @property
    def posterior_covariance(self) -> Tensor:
        """Dense Σ = P⁻¹, (P, P) — for tests and small models only."""
        scale, delta = self._precision_args()
        return self.H.covariance_dense(scale, delta)

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal variances diag(Σ), (P,)."""
        scale, delta = self._precision_args()
        return self.H.covariance_diag(scale, delta)

    @property
    def posterior_scale(self) -> Tensor:
        """A square root of Σ, as in laplace-torch: (P,) standard deviations for ``"diag"``,
        else the lower Cholesky factor L (P, P) with L Lᵀ = Σ (dense: small models only)."""
        scale, delta = self._precision_args()
        if self.hessian_structure == "diag":
            return self.H.covariance_diag(scale, delta).sqrt()
        return torch.linalg.cholesky(self.H.covariance_dense(scale, delta))

    def functional_variance(self, J: Tensor) -> Tensor:
        """J Σ Jᵀ for Jacobians J (..., K, P): (..., K, K)."""
        scale, delta = self._precision_args()
        return self.H.inv_quad(J.to(self.H.dtype), scale, delta)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Draw θ ~ q(θ): (n_samples, P)."""
        scale, delta = self._precision_args()
        eps = torch.randn(
            n_samples, self.n_params, generator=generator, dtype=self.H.dtype, device=self.H.device
        )
        return self.mean + self.H.sample(eps, scale, delta).to(self.mean)

    def log_prob(self, theta: Tensor) -> Tensor:
        """log q(θ) for θ of shape (P,) or (n, P): 0-d or (n,)."""
        scale, delta = self._precision_args()
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"theta must have {self.n_params} entries in its last dimension")
        v = (theta - self.mean).to(self.H.dtype)
        quad = scale * (v * self.H.matvec(v)).sum(-1) + (delta * v.square()).sum(-1)
        logdet = self.H.logdet(scale, delta)
        return 0.5 * (logdet - self.n_params * math.log(2 * math.pi) - quad)

    # ---- predictions --------------------------------------------------------------------------
    def functional_moments(self, x: Tensor, joint: bool = False, chunk_size: int | None = None,
                           create_graph: bool = False, backend: str = "auto"
                           ) -> tuple[Tensor, Tensor]:
        """GLM moments f(x) ~ N(f(x; θ*), J Σ Jᵀ); see :func:`marglik.posterior.glm.glm_moments`.

        ``backend``: ``"auto"`` (layer-wise where it applies), ``"layerwise"`` or ``"generic"``.
        The model runs in eval mode and is left as it was.
        """
        with eval_mode(self.model, requires_grad=None):
            return glm_moments(self, x, joint, chunk_size, backend, create_graph)

    def functional_moment_chunks(self, x: Tensor, chunk_size: int | None = None,
                                 create_graph: bool = False, backend: str = "auto",
                                 centred: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Per-input GLM moments over chunks of x whose size bounds the memory. Each chunk runs
        in eval mode with the model's state restored before it is handed out. ``centred``:
        P Σ P for outputs (B, C), from C − 1 output columns (:func:`~marglik.posterior.glm.
        glm_moment_chunks`)."""
        chunks = glm_moment_chunks(self, x, chunk_size, backend, create_graph, centred)
        while True:
            with eval_mode(self.model, requires_grad=None):
                item = next(chunks, None)
            if item is None:
                return
            yield item

    def function_samples(self, x: Tensor, n_samples: int = 100,
                         generator: torch.Generator | None = None,
                         chunk_size: int | None = None) -> Tensor:
        """Outputs of the network at θ ~ q(θ): (n_samples, B, ...) (no observation noise)."""
        self.require_fit()
        thetas = self.sample(n_samples, generator)
        with eval_mode(self.model):
            return sample_outputs(self.model, self.subset, thetas, x, chunk_size)

    # ---- saving and loading -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and strings, loadable with ``torch.load(weights_only=True)``."""
        self.require_fit()
        return laplace_state(self)

    def load_state_dict(self, state: dict) -> Laplace:
        """Restore a posterior saved by :meth:`state_dict` for the same model and settings.

        Its tensors are moved to the device of the model, whichever device they were saved on.
        """
        load_laplace_state(self, state)
        self.train_loader = None  # the data are not saved
        if not torch.allclose(self.subset.vector(self.model).to(self.mean), self.mean):
            warnings.warn(
                "the model's weights differ from the posterior mean of the loaded state",
                stacklevel=2,
            )
        return self
