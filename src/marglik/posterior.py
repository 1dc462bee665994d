"""The Laplace posterior q(θ) = N(θ*, (H/T + P0)⁻¹) over all weights, the last layer or a subset.

Daxberger et al., "Laplace Redux", NeurIPS 2021; Immer et al., ICML 2021. One class composed of
parts — a :class:`~marglik.curvature.subsets.ParameterSubset`, a likelihood, and a curvature
:class:`~marglik.structures.BlockDiagonal` — instead of a class per subset × structure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from marglik.curvature.engine import Curvature, batches, fit_curvature
from marglik.curvature.subsets import ParameterSubset, select_subset
from marglik.likelihoods import Gaussian, Likelihood, get_likelihood
from marglik.likelihoods.gaussian import check_sigma
from marglik.structures import BlockDiagonal, block_from_state_dict

FORMAT = "marglik.Laplace/1"


class Laplace:
    """Laplace approximation around the trained weights θ* of ``model``.

    Args:
        model: a trained ``nn.Module``; it is never modified (hooks are removed, modes and
            ``requires_grad`` flags restored).
        likelihood: ``"regression"`` (Gaussian), ``"classification"`` (softmax), ``"binary"``
            (Bernoulli) or a :class:`~marglik.likelihoods.Likelihood`.
        subset_of_weights: ``"all" | "last_layer" | "subnetwork" | "requires_grad"``.
        hessian_structure: ``"kron" | "full" | "diag" | "lowrank"``.
        curvature: ``"ggn" | "ef" | "ggn-mc"``.
        kfac_approx: ``"expand" | "reduce"`` for weight-sharing layers.
        prior_precision: δ > 0: a scalar, one value per parameter tensor of the subset
            ("layer-wise", in ``named_parameters()`` order) or one per parameter.
        sigma_noise: σ of the Gaussian likelihood (regression only), scalar or one per output;
            given with a :class:`~marglik.likelihoods.Gaussian` object, it replaces that σ.
        temperature: T; the posterior precision is H/T + P0.
        prior_mean: μ0, a scalar or one value per parameter.
        subnetwork: module or parameter names, a boolean mask or flat indices for
            ``"subnetwork"``.
        last_layer_name: module name of the last layer (default: found by running the model).
        rank: number of eigenpairs for ``"lowrank"``.
        mc_samples: sampled targets per input for ``"ggn-mc"``.
        seed: seed for Monte Carlo curvature and Lanczos.
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
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = get_likelihood(likelihood, sigma_noise)
        sigma_given = not (isinstance(sigma_noise, (int, float)) and sigma_noise == 1.0)
        if sigma_given and not isinstance(self.likelihood, Gaussian):
            raise ValueError(f"sigma_noise only applies to regression, not {self.likelihood.task}")
        if sigma_given and isinstance(likelihood, Likelihood):  # never silently ignored
            self.sigma_noise = sigma_noise
        self.subset_of_weights = subset_of_weights
        self.hessian_structure = hessian_structure
        self.curvature = curvature
        self.kfac_approx = kfac_approx
        if temperature <= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature)
        self.rank, self.mc_samples, self.seed = rank, mc_samples, seed
        self._subnetwork, self._last_layer_name = subnetwork, last_layer_name
        self.subset: ParameterSubset | None = None
        if subset_of_weights != "last_layer" or last_layer_name is not None:
            self.subset = select_subset(model, subset_of_weights, subnetwork, last_layer_name)
        self._prior_precision = _check_prior(prior_precision)
        self._prior_mean = torch.as_tensor(prior_mean, dtype=self._param_dtype)
        self.mean: Tensor | None = None
        self.H: BlockDiagonal | None = None
        self.statistics: dict[str, Tensor] = {}
        self.n_data = 0
        self._sigma_fit: Tensor | None = None
        if self.subset is not None:
            self._check_prior_shapes()

    # ---- fitting ------------------------------------------------------------------------------
    def fit(
        self, train_loader: Iterable, progress: bool = False, create_graph: bool = False
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
        """
        if self.subset is None:  # last layer found from the first batch
            first = next(iter(train_loader), None)
            if first is None:
                raise ValueError("the data loader is empty")
            x, _ = next(batches([first], self.model))
            self.subset = select_subset(self.model, "last_layer", example_input=x)
            self._check_prior_shapes()
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
        )
        self.H, self.statistics, self.n_data = curv.structure, curv.statistics, curv.n_data
        self.mean = self.subset.vector(self.model)
        self._sigma_fit = (
            self.sigma_noise.detach().clone() if self.sigma_noise is not None else None
        )
        return self

    def _require_fit(self) -> None:
        if self.H is None:
            raise RuntimeError("the Laplace posterior is not fitted: call fit(train_loader) first")

    # ---- hyperparameters ----------------------------------------------------------------------
    @property
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_params(self) -> int:
        """Number of parameters P in the posterior."""
        if self.subset is None:
            raise RuntimeError("the last layer is found during fit(): call fit() first")
        return self.subset.size

    @property
    def prior_precision(self) -> Tensor:
        """δ: 0-d, (number of parameter tensors,) or (P,)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior_precision = _check_prior(value)
        if self.subset is not None:
            self._check_prior_shapes()

    @property
    def prior_mean(self) -> Tensor:
        return self._prior_mean

    @property
    def sigma_noise(self) -> Tensor | None:
        """σ of a Gaussian likelihood, else None."""
        return self.likelihood.sigma if isinstance(self.likelihood, Gaussian) else None

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        if not isinstance(self.likelihood, Gaussian):
            raise ValueError(f"sigma_noise only applies to regression, not {self.likelihood.task}")
        self.likelihood.sigma = check_sigma(value)

    def _check_prior_shapes(self) -> None:
        n_tensors, P = len(self.subset.names), self.subset.size
        if self._prior_precision.ndim == 1 and self._prior_precision.numel() not in (n_tensors, P):
            raise ValueError(
                f"prior_precision has {self._prior_precision.numel()} values: give a scalar, "
                f"{n_tensors} (one per parameter tensor) or {P} (one per parameter)"
            )
        if self._prior_mean.ndim > 1 or self._prior_mean.numel() not in (1, P):
            raise ValueError(f"prior_mean must be a scalar or have {P} values")

    def expand_prior(self, prior_precision: Tensor) -> Tensor:
        """δ as 0-d (scalar) or per parameter (P,), from scalar / layer-wise / per-parameter."""
        delta = _check_prior(prior_precision)
        if delta.ndim == 0:
            return delta
        counts = self.subset.numel_per_tensor
        if delta.numel() == len(counts) and delta.numel() != self.n_params:
            return delta.repeat_interleave(torch.tensor(counts, device=delta.device))
        if delta.numel() != self.n_params:
            raise ValueError(
                f"prior_precision must be a scalar, {len(counts)} or {self.n_params} values"
            )
        return delta

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

    # ---- evidence -----------------------------------------------------------------------------
    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D | θ*) of the training data (0-d)."""
        self._require_fit()
        if sigma_noise is None and self.sigma_noise is not None:
            sigma_noise = self.sigma_noise
        return self.likelihood.log_lik_from_statistics(self.statistics, sigma_noise)

    def log_det_ratio(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """log det P − log det P0 (0-d)."""
        self._require_fit()
        delta = _check_prior(self.prior_precision if prior_precision is None else prior_precision)
        scale = self._scale(sigma_noise)
        if self._is_layerwise(delta):  # one δ per block where a block is one tensor
            delta = delta.to(self.H.device, self.H.dtype)
            counts = torch.tensor(self.subset.numel_per_tensor, device=delta.device)
            logdet_prior = (counts * delta.log()).sum()
            return self.H.logdet_per_block(scale, self._block_deltas(delta)) - logdet_prior
        delta = self.expand_prior(delta).to(self.H.device, self.H.dtype)
        logdet_prior = delta.log().sum() if delta.ndim else self.n_params * delta.log()
        return self.H.logdet(scale, delta) - logdet_prior

    def _is_layerwise(self, delta: Tensor) -> bool:
        return delta.ndim == 1 and len(self.subset.names) == delta.numel() != self.n_params

    def _block_deltas(self, delta: Tensor) -> list[Tensor]:
        """A layer-wise δ (one per tensor) as one δ per block of H: 0-d inside one tensor."""
        counts = self.subset.numel_per_tensor
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        expanded = None
        out = []
        for start, stop in zip(self.H.offsets[:-1], self.H.offsets[1:]):
            tensor = next(i for i in range(len(counts)) if bounds[i] <= start < bounds[i + 1])
            if stop <= bounds[tensor + 1]:
                out.append(delta[tensor])
            else:  # the block spans several tensors (e.g. a full H): per-parameter values
                if expanded is None:
                    expanded = delta.repeat_interleave(torch.tensor(counts, device=delta.device))
                out.append(expanded[start:stop])
        return out

    def scatter(self, prior_precision: Tensor | None = None) -> Tensor:
        """(θ* − μ0)ᵀ P0 (θ* − μ0) (0-d)."""
        self._require_fit()
        delta = _check_prior(self.prior_precision if prior_precision is None else prior_precision)
        diff = self.mean - self.prior_mean.to(self.mean)
        if self._is_layerwise(delta):
            parts = diff.square().split(self.subset.numel_per_tensor)
            squares = torch.stack([part.sum() for part in parts])
            return (delta.to(squares) * squares).sum()
        return (self.expand_prior(delta).to(diff) * diff.square()).sum()

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace evidence log Z = log p(D|θ*) − ½ (θ*−μ0)ᵀP0(θ*−μ0) − ½ (log det P − log det P0).

        Differentiable in ``prior_precision`` and ``sigma_noise`` (which default to the current
        values); the curvature is not refitted: for regression H scales as (σ_fit/σ)².
        """
        return (
            self.log_likelihood(sigma_noise)
            - 0.5 * self.scatter(prior_precision)
            - 0.5 * self.log_det_ratio(prior_precision, sigma_noise)
        )

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
        """Maximise the evidence over δ (and σ) by Adam in log space (:mod:`marglik.evidence`)."""
        from marglik.evidence import optimize_hyperparameters

        if method != "marglik":
            raise ValueError(f"unknown method {method!r}: only 'marglik' is available")
        return optimize_hyperparameters(
            self, prior_structure, tune_sigma, n_steps, lr, init_prior_prec, progress
        )

    # ---- the Gaussian posterior ---------------------------------------------------------------
    def _precision_args(self) -> tuple[Tensor, Tensor]:
        self._require_fit()
        return self._scale(None), self.expand_prior(self.prior_precision).to(
            self.H.device, self.H.dtype
        )

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
        from marglik.predictive import predict

        return predict(
            self,
            x,
            pred_type,
            link_approx,
            joint,
            n_samples,
            generator,
            pred_var=pred_var,
            enable_backprop=enable_backprop,
            chunk_size=chunk_size,
        )

    # ---- saving and loading -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and strings, loadable with ``torch.load(weights_only=True)``."""
        self._require_fit()
        return {
            "format": FORMAT,
            "likelihood": type(self.likelihood).__name__,
            "hessian_structure": self.hessian_structure,
            "curvature": self.curvature,
            "kfac_approx": self.kfac_approx,
            "subset": self.subset.state(),
            "mean": self.mean,
            "prior_precision": self.prior_precision,
            "prior_mean": self.prior_mean,
            "temperature": self.temperature,
            "sigma_noise": self.sigma_noise,
            "sigma_fit": self._sigma_fit,
            "n_data": self.n_data,
            "statistics": dict(self.statistics),
            "H": self.H.state_dict(),
        }

    def load_state_dict(self, state: dict) -> Laplace:
        """Restore a posterior saved by :meth:`state_dict` for the same model and settings.

        Its tensors are moved to the device of the model, whichever device they were saved on.
        """
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a marglik.Laplace state_dict")
        mine = {
            "likelihood": type(self.likelihood).__name__,
            "hessian_structure": self.hessian_structure,
            "curvature": self.curvature,
            "kfac_approx": self.kfac_approx,
        }
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r}, this posterior has {value!r}"
                )
        names = state["subset"]["names"]
        params = dict(self.model.named_parameters())
        for name, shape in zip(names, state["subset"]["shapes"]):
            if name not in params or list(params[name].shape) != list(shape):
                raise ValueError(
                    f"state_dict does not match the model: parameter {name!r} with shape "
                    f"{tuple(shape)} is missing or has another shape"
                )
        subset = ParameterSubset(
            names, [torch.Size(s) for s in state["subset"]["shapes"]], state["subset"]["index"]
        )
        if self.subset is not None and (self.subset.names != subset.names):
            raise ValueError(
                f"state_dict covers parameters {names}, this posterior {self.subset.names}"
            )
        self.subset = subset
        device = next(self.model.parameters()).device  # tensors follow the model, as in nn.Module
        self.mean = state["mean"].to(device)
        self.prior_precision = state["prior_precision"]
        self._prior_mean = state["prior_mean"]
        self.temperature = state["temperature"]
        if state["sigma_noise"] is not None:
            self.sigma_noise = state["sigma_noise"]
        self._sigma_fit = state["sigma_fit"]
        self.n_data = state["n_data"]
        self.statistics = {k: v.to(device) for k, v in state["statistics"].items()}
        self.H = block_from_state_dict(state["H"]).to(device)
        if not torch.allclose(self.subset.vector(self.model).to(self.mean), self.mean):
            warnings.warn(
                "the model's weights differ from the posterior mean of the loaded state",
                stacklevel=2,
            )
        return self


def _check_prior(value: float | Tensor) -> Tensor:
    """δ as a tensor: 0-d or 1-d, positive and finite."""
    value = torch.as_tensor(
        value, dtype=None if torch.is_tensor(value) else torch.get_default_dtype()
    )
    if value.ndim > 1 or value.numel() == 0:
        raise ValueError(
            f"prior_precision must be a scalar or a vector, got shape {tuple(value.shape)}"
        )
    if not torch.isfinite(value).all() or (value <= 0).any():
        raise ValueError("prior_precision must be positive and finite")
    return value
