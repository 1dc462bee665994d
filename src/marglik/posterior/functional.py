"""The function-space (GP / NTK) Laplace posterior: exact, subset of data, or Nyström.

Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via local linearization",
AISTATS 2021: the linearised Laplace posterior with the GGN is a GP over the network outputs with
the kernel κ(x, x') = J(x) P0⁻¹ J(x')ᵀ (the NTK under the prior) and mean f(x; θ*). This class
works with that GP: its evidence and predictive come from N·D × N·D kernels instead of P × P
matrices (the maths is in :mod:`marglik.posterior.function_space`, the data passes in
:mod:`marglik.posterior.kernel_data`), and it fits the interface of
:class:`~marglik.posterior.base.Posterior`, so ``la(x)``, ``optimize_prior_precision`` and the
sampling predictive work unchanged. ``docs/function-space.md`` has the maths and the API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from marglik.curvature.batches import batch_size, batches, call_model, slice_inputs, to_model
from marglik.curvature.runtime import eval_mode, preserved
from marglik.curvature.subsets import (
    ParameterSubset,
    find_last_layer,
    own_parameter_names,
    select_subset,
)
from marglik.evidence.laplace import laplace_log_evidence
from marglik.likelihoods import Gaussian, Likelihood
from marglik.likelihoods.gaussian import check_sigma
from marglik.posterior import function_space as fs
from marglik.posterior.base import Posterior
from marglik.posterior.functional_state import functional_state, load_functional_state
from marglik.posterior.jacobians import per_sample_jacobians
from marglik.posterior.kernel_data import (
    check_subset_options,
    choose_subset,
    data_pass,
    parameter_groups,
)
from marglik.posterior.prior import Prior, as_model_dtype, check_precision
from marglik.posterior.samples import sample_outputs
from marglik.predictive.links import centre_covariance
from marglik.structures.base import sym_eigvalsh

__all__ = ["FunctionalLaplace"]

#: Default bound on the Jacobian numbers held per chunk of test inputs.
MAX_ELEMENTS = 2**24


class FunctionalLaplace(Posterior):
    """Laplace posterior of a trained network in function space, as a GP with the prior NTK.

    Three ways to use the training data (``n_subset``, ``nystrom``; ``docs/function-space.md``
    has the maths, the costs and what each estimates):

    - exact (``n_subset=None``): all N points; the evidence and the predictive equal those of
      ``Laplace(hessian_structure="full")`` (GGN) to rounding;
    - subset of data (``n_subset=M``): the GP conditioned on M points chosen at random or
      balanced over classes; the evidence keeps the exact data fit and scatter and rescales
      the subset's log-determinant by N/M. For a uniformly random subset that is an unbiased
      estimate of the data-partitioned bound of Immer et al. (ICML 2023) averaged over random
      partitions into blocks of M (:class:`marglik.evidence.PartitionedEvidence`), a lower
      bound of the exact evidence in expectation (not for every draw); with M = N it is exact;
      a class-balanced subset is a stratified draw and estimates no bound exactly;
    - Nyström (``n_subset=M, nystrom=True``): the M points are inducing inputs,
      K_XX ≈ K_XZ K_ZZ⁻¹ K_ZX; the evidence covers all N points through an M·D × M·D
      determinant and is an upper bound of the exact one; the predictive is the DTC one.

    Args:
        model: a trained network, left exactly as it was (every pass runs in eval mode inside
            :func:`~marglik.curvature.runtime.preserved`).
        likelihood: ``"regression"``, ``"classification"``, ``"binary"`` or a
            :class:`~marglik.likelihoods.Likelihood` (e.g. the heteroscedastic
            :class:`~marglik.likelihoods.NaturalGaussian`), any with a ``hessian_factor``.
        subset_of_weights: ``"all" | "last_layer" | "subnetwork" | "requires_grad"``, as for
            :class:`~marglik.Laplace`.
        prior_precision: δ > 0: a scalar, one value per prior group (layer-wise by default), or
            one per parameter (exact and subset only: the kernel is then recomputed from the
            kept Jacobians, O((N·D)²·P) per evaluation).
        sigma_noise: σ of a Gaussian likelihood (scalar or one per output).
        temperature: T; the posterior precision is H/T + P0.
        prior_mean: μ0, a scalar or one value per parameter.
        subnetwork, last_layer_name, prior_groups, dict_key_x, dict_key_y: as for
            :class:`~marglik.Laplace`.
        n_subset: M, the points of a subset-of-data or Nyström posterior (None: all N).
        subset_method: ``"random"`` or ``"class"`` (balanced over classes; classification and
            binary likelihoods).
        nystrom: use the M points as Nyström inducing inputs for all N.
        seed: seed of the subset choice (a fresh generator each ``fit``: refitting chooses the
            same points); ``generator`` overrides it.

    Attributes:
        indices: the chosen points' positions in the loader (M,), or None for exact.
        mean: θ* (P,).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        subset_of_weights: str = "all",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        prior_mean: float | Tensor = 0.0,
        subnetwork: list[str] | Tensor | None = None,
        last_layer_name: str | None = None,
        prior_groups: list[list[str]] | None = None,
        n_subset: int | None = None,
        subset_method: str = "random",
        nystrom: bool = False,
        seed: int = 0,
        generator: torch.Generator | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ):
        self._init_model(model, likelihood, sigma_noise, temperature)
        check_subset_options(n_subset, subset_method, nystrom, self.likelihood.task)
        self.n_subset, self.subset_method, self.nystrom = n_subset, subset_method, nystrom
        self.seed, self.generator = seed, generator
        self.subset_of_weights = subset_of_weights
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else None
        self.prior = Prior(as_model_dtype(prior_precision, model),
                           torch.as_tensor(prior_mean, dtype=dtype), prior_groups)
        self.subset: ParameterSubset | None = None
        self.last_layer_name = last_layer_name
        if subset_of_weights != "last_layer" or last_layer_name is not None:
            self._set_subset(select_subset(model, subset_of_weights, subnetwork, last_layer_name))
        self.mean: Tensor | None = None
        self.indices: Tensor | None = None
        self.statistics: dict[str, Tensor] = {}
        self.n_data = 0
        self._J: Tensor | None = None  # Jacobians at the kernel points (n, D, P)
        self._W: Tensor | None = None  # factors of Λ where Λ enters (None: Gaussian, from σ)
        self._gram: Tensor | None = None  # per-group kernels at the kernel points (G, nD, nD)
        self._cross: Tensor | None = None  # Nyström: per-group K_XZ (G, N·D, M·D)
        self._out_shape: torch.Size | None = None
        self._cache: tuple | None = None
        self._eigenvalues: Tensor | None = None

    def _set_subset(self, subset: ParameterSubset) -> None:
        self.subset = subset
        self.prior.bind(subset.names, subset.numel_per_tensor)

    @property
    def mode(self) -> str:
        """``"exact"``, ``"subset"`` or ``"nystrom"``."""
        return "exact" if self.n_subset is None else ("nystrom" if self.nystrom else "subset")

    @property
    def is_fitted(self) -> bool:
        return self._J is not None

    @property
    def n_params(self) -> int:
        if self.subset is None:
            raise RuntimeError("the last layer is found during fit(): call fit() first")
        return self.subset.size

    # ---- fitting ------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, progress: bool = False,
            create_graph: bool = False) -> FunctionalLaplace:
        """Compute the kernels over ``train_loader`` at the network's current weights θ*.

        Exact: one pass. Subset / Nyström: a pass for the data fit and the targets, one for the
        chosen points, and (Nyström) one for the cross-kernels, so the loader must give the
        same data in the same order each time (``shuffle=False``). With ``create_graph=True``
        the data fit, Jacobians, factors and kernels keep their graph to tensors the forward
        pass uses besides the posterior's weights, and the evidence is differentiable in them
        (registered hyperparameters; the Jacobians then take one backward pass per output).
        """
        with preserved(self.model):
            if self.subset is None:
                first = next(iter(train_loader), None)
                if first is None:
                    raise ValueError("the data loader is empty")
                x, _ = next(batches([first], self.model, self.dict_key_x, self.dict_key_y))
                self.last_layer_name = find_last_layer(self.model, x)
                own = own_parameter_names(self.model, self.last_layer_name)
                self._set_subset(select_subset(self.model, "subnetwork", own))
            trainable = list(self.subset.names)
            if create_graph:
                trainable += [n for n, p in self.model.named_parameters() if p.requires_grad]
            with eval_mode(self.model, trainable):
                self._fit_passes(train_loader, create_graph)
        self.mean = self.subset.vector(self.model)
        self._cache = self._eigenvalues = None
        return self

    def _fit_passes(self, loader: Iterable, create_graph: bool) -> None:
        args = (self.model, self.likelihood, loader, self.subset,
                (self.dict_key_x, self.dict_key_y))
        groups, n_groups = parameter_groups(self.prior), self.prior.n_groups
        if self.n_subset is None:
            points = first = data_pass(*args, select="all", create_graph=create_graph)
            self.indices = None
        else:
            first = data_pass(*args, create_graph=create_graph)
            generator = self.generator or torch.Generator().manual_seed(self.seed)
            targets = first.targets if self.subset_method == "class" else None
            self.indices = choose_subset(first.n_data, self.n_subset, self.subset_method,
                                         targets, generator)
            points = data_pass(*args, select=self.indices, expected_targets=first.targets,
                               create_graph=create_graph)
        J = points.jacobians
        rows = J.reshape(-1, J.shape[-1])
        self._cross, self._W = None, points.factors
        if self.nystrom:
            full = data_pass(*args, cross=(rows, groups, n_groups),
                             expected_targets=first.targets, create_graph=create_graph)
            self._cross, self._W = full.cross, full.factors
        self._gram = fs.group_kernels(rows, rows, groups, n_groups)
        self._J, self._out_shape = J, first.out_shape
        self.statistics, self.n_data = first.statistics, first.n_data

    # ---- hyperparameters ----------------------------------------------------------------------
    def _delta(self, prior_precision: Tensor | None) -> Tensor:
        delta = self.prior.precision if prior_precision is None else prior_precision
        return check_precision(delta).to(self._gram.device, self._gram.dtype)

    def _inverse_delta(self, delta: Tensor) -> tuple[str, Tensor]:
        """("group", 1/δ per group (G,)) or ("parameter", 1/δ per parameter (P,))."""
        kind = self.prior.kind(delta)
        if kind == "scalar":
            return "group", (1 / delta).expand(self.prior.n_groups)
        return ("group" if kind == "group" else "parameter"), 1 / delta

    def _factor(self, sigma_noise: Tensor | None, unit: bool = False) -> Tensor:
        """W with W_n W_nᵀ = Λ_n / T where Λ enters, (n, D, K); Gaussian: from σ.
        ``unit``: at σ = 1 and T = 1."""
        if isinstance(self.likelihood, Gaussian):
            sigma = self.sigma_noise if sigma_noise is None else check_sigma(sigma_noise)
            sigma = torch.ones_like(sigma) if unit else sigma
            w = (torch.ones(self._out_shape, dtype=self._gram.dtype, device=self._gram.device)
                 / sigma.to(self._gram)).reshape(-1)
            n = self._cross.shape[1] // w.numel() if self.nystrom else self._J.shape[0]
            W = torch.diag_embed(w).expand(n, w.numel(), w.numel())
        else:
            if sigma_noise is not None:
                raise ValueError(
                    f"sigma_noise only applies to regression, not {self.likelihood.task}")
            W = self._W
        return W if unit else W / math.sqrt(self.temperature)

    def _kernel(self, inverse: tuple[str, Tensor]) -> Tensor:
        """κ over the kernel points under the prior, (n·D, n·D)."""
        kind, value = inverse
        if kind == "group":
            return fs.summed_kernel(self._gram, value)
        rows = self._J.reshape(-1, self._J.shape[-1])
        return (rows * value.to(rows)) @ rows.T

    def _evidence_matrix(self, delta: Tensor, sigma_noise: Tensor | None, unit: bool = False
                         ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(chol K_ZZ or None, A with S = I + A, W) for δ and σ: A = Wᵀ K W, or for Nyström
        Ψ Ψᵀ with Ψ = L⁻¹ K_ZX W (M·D × M·D)."""
        inverse = self._inverse_delta(delta)
        W = self._factor(sigma_noise, unit)
        if not self.nystrom:
            return None, fs.project(W, self._kernel(inverse), W), W
        if inverse[0] == "parameter":
            raise ValueError("a per-parameter prior precision needs the Jacobians of all "
                             "training points, which the Nyström posterior does not keep: use "
                             "a scalar or per-group prior_precision, or nystrom=False")
        L = fs.cholesky_jittered(fs.summed_kernel(self._gram, inverse[1]))
        G = fs.project_rows(W, fs.summed_kernel(self._cross, inverse[1]))  # Wᵀ K_XZ (N·K, M·D)
        psi = torch.linalg.solve_triangular(L, G.T, upper=False)
        return L, psi @ psi.T, W

    def _factors(self, delta: Tensor, sigma_noise: Tensor | None
                 ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(chol K_ZZ or None, chol of the evidence matrix S = I + A, W) for δ and σ."""
        L, A, W = self._evidence_matrix(delta, sigma_noise)
        return L, fs.identity_plus(A), W

    def _uniform_scale(self, delta: Tensor, sigma_noise: Tensor | None) -> Tensor | None:
        """c with A(δ, σ, T) = c · A(1, 1, 1) where one number scales A: one δ for every
        parameter (and a scalar σ), c = 1/(δ T σ²); None otherwise or with a graph to
        registered hyperparameters."""
        if delta.numel() != 1 or self._gram.requires_grad:
            return None
        c = 1 / (delta.reshape(()) * self.temperature)
        if isinstance(self.likelihood, Gaussian):
            sigma = self.sigma_noise if sigma_noise is None else check_sigma(sigma_noise)
            if sigma.numel() != 1:
                return None
            c = c / sigma.reshape(()).to(c) ** 2
        return c

    def _spectrum(self) -> Tensor:
        """Eigenvalues of A(1, 1, 1), computed once per fit: then an evidence evaluation with
        one δ costs O(n·K) (log det(I + c A) = Σ log(1 + c λ_i))."""
        if self._eigenvalues is None:
            with torch.no_grad():
                one = torch.ones((), dtype=self._gram.dtype, device=self._gram.device)
                _, A, _ = self._evidence_matrix(one, None, unit=True)
                self._eigenvalues = sym_eigvalsh(A)
        return self._eigenvalues

    def _cached_factors(self) -> tuple[Tensor | None, Tensor, Tensor]:
        """:meth:`_factors` at the stored δ and σ, without graph, cached until they change."""
        delta = self._delta(None).detach()
        sigma = None if self.sigma_noise is None else self.sigma_noise.detach()
        key = (delta, sigma, self.temperature)
        if self._cache is not None and fs.same_values(self._cache[0], key):
            return self._cache[1]
        with torch.no_grad():
            value = tuple(None if t is None else t.detach() for t in self._factors(delta, None))
        self._cache = (tuple(k.clone() if torch.is_tensor(k) else k for k in key), value)
        return value

    # ---- evidence -----------------------------------------------------------------------------
    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """log p(D | θ*) over all N training points (0-d)."""
        self.require_fit()
        if sigma_noise is None and self.sigma_noise is not None:
            sigma_noise = self.sigma_noise
        elif sigma_noise is not None:  # a Python float too
            sigma_noise = check_sigma(sigma_noise)
        return self.likelihood.log_lik_from_statistics(self.statistics, sigma_noise)

    def log_det_ratio(self, prior_precision: Tensor | None = None,
                      sigma_noise: Tensor | None = None) -> Tensor:
        """log det(I + Wᵀ K W), rescaled by N/M for a subset, Nyström form for ``nystrom``."""
        self.require_fit()
        delta = self._delta(prior_precision)
        c = self._uniform_scale(delta, sigma_noise)
        if c is not None:
            logdet = torch.log1p(c * self._spectrum()).sum()
        else:
            logdet = fs.log_det_from_cholesky(self._factors(delta, sigma_noise)[1])
        if self.mode == "subset":
            return logdet * (self.n_data / self.n_subset)
        return logdet

    def log_marginal_likelihood(self, prior_precision: Tensor | None = None,
                                sigma_noise: Tensor | None = None) -> Tensor:
        """log Z = log p(D|θ*) − ½ (θ*−μ0)ᵀP0(θ*−μ0) − ½ log det(I + Λ^½ K Λ^½ / T).

        Differentiable in ``prior_precision`` and ``sigma_noise`` (default: the stored ones)
        and, after ``fit(create_graph=True)``, in registered hyperparameters. Values passed are
        kept (detached), as for :meth:`marglik.Laplace.log_marginal_likelihood`. The subset and
        Nyström forms are in the class docstring.
        """
        self.require_fit()
        value = laplace_log_evidence(
            self.log_likelihood(sigma_noise),
            self.prior.scatter(self.mean, self._delta(prior_precision)),
            self.log_det_ratio(prior_precision, sigma_noise),
        )
        self._keep(prior_precision, sigma_noise)
        return value

    # ---- predictions --------------------------------------------------------------------------
    def functional_moments(self, x: Tensor, joint: bool = False, chunk_size: int | None = None,
                           create_graph: bool = False, backend: str = "auto"
                           ) -> tuple[Tensor, Tensor]:
        """GP posterior at inputs x: f(x; θ*) (B, ...) and K** − K*X W S⁻¹ Wᵀ K_X*,
        per input (B, D, D) or joint (B·D, B·D) (Nyström: the DTC covariance).
        ``backend`` is ignored (one implementation)."""
        self.require_fit()
        if joint:
            with eval_mode(self.model, requires_grad=None):
                return self._moments(to_model(x, self.model), True, create_graph)
        means, covs = zip(*self.functional_moment_chunks(x, chunk_size, create_graph, backend))
        return torch.cat(means), torch.cat(covs)

    def functional_moment_chunks(self, x: Tensor, chunk_size: int | None = None,
                                 create_graph: bool = False, backend: str = "auto",
                                 centred: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Per-input moments over chunks of x, each holding about :data:`MAX_ELEMENTS` numbers
        (Jacobians and cross-kernels), or ``chunk_size`` inputs; ``centred``: P Σ P for
        outputs (B, C) (:meth:`Posterior.functional_moment_chunks`)."""
        self.require_fit()
        x = to_model(x, self.model)
        n = batch_size(x, self.dict_key_x)
        if chunk_size is None:
            _, D, P = self._J.shape
            chunk_size = max(1, MAX_ELEMENTS // (D * P + 3 * self._J.shape[0] * D * D))
        for start in range(0, n, chunk_size):
            with eval_mode(self.model, requires_grad=None):
                f, cov = self._moments(slice_inputs(x, start, start + chunk_size), False,
                                       create_graph)
            yield f, (centre_covariance(cov) if centred and f.ndim == 2 else cov)

    def _moments(self, x, joint: bool, create_graph: bool) -> tuple[Tensor, Tensor]:
        L, L_S, W = self._cached_factors()
        f = call_model(self.model, x)
        J = per_sample_jacobians(self.model, self.subset, x, f.shape[1:], f.dtype, create_graph)
        if not create_graph:
            f, J = f.detach(), J.detach()
        B, D, P = J.shape
        J = J.to(L_S.dtype)
        inv = 1 / self.prior.expand(self._delta(None)).to(J)
        scaled = J * inv
        prior_cov = (scaled.reshape(B * D, P) @ J.reshape(B * D, P).T if joint
                     else torch.einsum("bdp,bep->bde", scaled, J))
        K_ps = self._J.reshape(-1, P).detach().to(J) @ scaled.reshape(B * D, P).T
        cov = fs.posterior_covariance(prior_cov, K_ps, W, L_S, L, B, joint)
        return f.to(cov.dtype), cov

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """θ ~ N(θ*, (P0 + Jᵀ Λ J / T)⁻¹) over the kernel points, (n_samples, P), by pathwise
        conditioning (:func:`~marglik.posterior.function_space.pathwise_map`); exact and subset
        posteriors only (a subset's conditions on its M points, without the N/M rescaling)."""
        self.require_fit()
        if self.nystrom:
            raise ValueError("weight samples are not available for a Nyström posterior (its "
                             "DTC predictive is no weight-space Gaussian): use the GLM "
                             "predictive, pred_type='glm'")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        _, L_S, W = self._cached_factors()
        inv = 1 / self.prior.expand(self._delta(None))
        dev = fs.pathwise_samples(self._J.detach(), W, inv, L_S, n_samples, generator)
        return self.mean + dev.to(self.mean)

    def function_samples(self, x: Tensor, n_samples: int = 100,
                         generator: torch.Generator | None = None,
                         chunk_size: int | None = None) -> Tensor:
        """Network outputs at θ ~ q(θ) (:meth:`sample`): (n_samples, B, ...)."""
        thetas = self.sample(n_samples, generator)
        with eval_mode(self.model):
            return sample_outputs(self.model, self.subset, thetas, to_model(x, self.model),
                                  chunk_size)

    # ---- saving and loading -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings (``torch.load(weights_only=True)``)."""
        self.require_fit()
        return functional_state(self)

    def load_state_dict(self, state: dict) -> FunctionalLaplace:
        """Restore :meth:`state_dict` output for the same model and settings."""
        load_functional_state(self, state)
        self._cache = self._eigenvalues = None
        return self

