"""Evidence maximisation over hyperparameters: one step shared by post-hoc and online use.

MacKay's evidence framework with the Laplace evidence (Immer et al., ICML 2021): Adam on the
negative log marginal likelihood over log δ (prior precision), log σ (observation noise) and any
registered differentiable hyperparameters h (e.g. augmentation or input-transformation
parameters; Immer et al., NeurIPS 2022). :class:`HyperparameterStep` holds them and takes one
step on a given objective; :func:`optimize_hyperparameters` runs it post hoc against a fitted
:class:`~marglik.posterior.base.Posterior` (each step only re-evaluates the cached
factorisations: O(P) for scalar/layer-wise priors with full/KFAC/diag structures), and
:func:`marglik.training.online.marglik_training` calls the same step during training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

if TYPE_CHECKING:
    from marglik.posterior.base import Posterior

__all__ = ["HyperparameterStep", "lbfgs_tolerance", "optimize_hyperparameters"]

#: objective(δ, σ) -> log Z (0-d); σ is None without a noise hyperparameter.
Objective = Callable[[Tensor, "Tensor | None"], Tensor]


class HyperparameterStep:
    """Adam in log space on δ (and σ), plus registered hyperparameters h in their own units.

    Args:
        log_prior: starting log δ (any shape the posterior accepts); becomes a leaf.
        log_sigma: starting log σ (0-d) or None.
        extra: registered hyperparameters h (leaf tensors requiring grad), or none.
        lr: Adam learning rate of log δ and log σ.
        extra_lr: Adam learning rate of h (default ``lr``). h has an optimizer of its own,
            :attr:`extra_optimizer`, so that a scheduler can act on h alone.
    """

    def __init__(self, log_prior: Tensor, log_sigma: Tensor | None = None,
                 extra: Sequence[Tensor] = (), lr: float = 0.1, extra_lr: float | None = None):
        self.log_prior = log_prior.detach().clone().requires_grad_(True)
        self.log_sigma = (
            None if log_sigma is None else log_sigma.detach().clone().requires_grad_(True)
        )
        self.extra = list(extra)
        self.optimizer = torch.optim.Adam(self.logs, lr=lr)
        self.extra_optimizer = (
            torch.optim.Adam(self.extra, lr=lr if extra_lr is None else extra_lr)
            if self.extra else None
        )

    @property
    def logs(self) -> list[Tensor]:
        """[log δ] or [log δ, log σ]."""
        return [self.log_prior] if self.log_sigma is None else [self.log_prior, self.log_sigma]

    @property
    def prior_precision(self) -> Tensor:
        """Current δ (detached)."""
        return self.log_prior.detach().exp()

    @property
    def sigma_noise(self) -> Tensor | None:
        """Current σ (detached) or None."""
        return None if self.log_sigma is None else self.log_sigma.detach().exp()

    def step(self, objective: Objective, extra: bool = True) -> float:
        """One Adam step on −objective(exp(log δ), exp(log σ)); returns the objective's value.

        With ``extra=False`` only log δ and log σ step (h is held, e.g. while its gradient is
        estimated separately and applied by :meth:`step_extra`).

        Raises:
            ValueError: a registered hyperparameter does not affect the objective.
        """
        self.optimizer.zero_grad()
        sigma = None if self.log_sigma is None else self.log_sigma.exp()
        value = objective(self.log_prior.exp(), sigma)
        params = [*self.logs, *(self.extra if extra else [])]
        grads = torch.autograd.grad(value, params, allow_unused=True)
        extra_grads = grads[len(self.logs):]
        _check_used(extra_grads)
        for p, g in zip(self.logs, grads):
            p.grad = torch.zeros_like(p) if g is None else -g
        self.optimizer.step()
        if extra_grads:
            self.step_extra(extra_grads)
        return value.item()

    def step_extra(self, gradients: Sequence[Tensor | None]) -> None:
        """One Adam step of h up the given evidence gradients ∂ log Z / ∂h (one per tensor).

        Raises:
            ValueError: a gradient is None (that hyperparameter does not affect the evidence).
        """
        _check_used(gradients)
        self.extra_optimizer.zero_grad()
        for p, g in zip(self.extra, gradients, strict=True):
            p.grad = -g.detach().to(p)
        self.extra_optimizer.step()


def _check_used(gradients: Sequence[Tensor | None]) -> None:
    """Every registered hyperparameter must have a gradient."""
    unused = [i for i, g in enumerate(gradients) if g is None]
    if unused:
        raise ValueError(
            f"hyperparameters{unused} do not affect the evidence: they must enter the "
            "model's forward pass in eval mode (the curvature is fitted in eval mode) or "
            "the likelihood"
        )


def optimize_hyperparameters(
    posterior: Posterior,
    prior_structure: str | None = None,
    tune_sigma: bool = False,
    n_steps: int = 100,
    lr: float = 0.1,
    init_prior_prec: float | Tensor | None = None,
    progress: bool = False,
    optimizer: str = "adam",
) -> dict[str, list]:
    """Maximise ``posterior.log_marginal_likelihood`` over log δ (and log σ); store the optimum.

    Args:
        posterior: a fitted posterior.
        prior_structure: ``"scalar" | "layerwise" | "diagonal"``; default keeps δ's shape.
        tune_sigma: also learn σ (regression only, scalar σ).
        n_steps, lr: Adam steps and learning rate; for ``"lbfgs"`` the most evaluations of the
            evidence (``lr`` unused).
        init_prior_prec: starting δ (default: the current one, broadcast to the shape).
        optimizer: ``"adam"`` (``n_steps`` steps, as laplace-torch) or ``"lbfgs"``: L-BFGS
            with a strong-Wolfe line search in log δ (and log σ), stopped when the gradient's
            largest entry falls below :func:`lbfgs_tolerance` — the optimum to within rounding,
            in far fewer evaluations where each costs a factorisation (a full posterior with a
            layer-wise or per-parameter δ: one Cholesky factorisation per evaluation).

    Returns:
        history with per-step (``"lbfgs"``: per evaluation, the last one at the stored
        optimum) ``"log_marglik"``, ``"prior_precision"`` and ``"sigma_noise"``.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'adam' or 'lbfgs'")
    posterior.require_fit()
    prior, dtype = posterior.prior, posterior.dtype
    current = prior.precision
    shape = tuple(current.shape) if prior_structure is None else prior.shape(prior_structure)
    start = (current if init_prior_prec is None else torch.as_tensor(init_prior_prec)).detach()
    start = prior.initial(shape, start.to(dtype))
    log_sigma = None
    if tune_sigma:
        if posterior.sigma_noise is None:
            raise ValueError(
                f"tune_sigma needs a regression likelihood, not {posterior.likelihood.task}"
            )
        if posterior.sigma_noise.numel() > 1:
            raise ValueError("tune_sigma supports a scalar sigma_noise only")
        log_sigma = posterior.sigma_noise.detach().to(dtype).log().reshape(())
    hyper = HyperparameterStep(start.log(), log_sigma, lr=lr)
    history: dict[str, list] = {"log_marglik": [], "prior_precision": [], "sigma_noise": []}

    def record(value: float) -> None:
        history["log_marglik"].append(value)
        history["prior_precision"].append(hyper.prior_precision.tolist())
        if tune_sigma:
            history["sigma_noise"].append(hyper.sigma_noise.item())

    if optimizer == "lbfgs":
        _lbfgs(posterior.log_marginal_likelihood, hyper.logs, n_steps, record, progress)
    else:
        for _ in trange(n_steps, disable=not progress, desc="evidence"):
            value = hyper.step(posterior.log_marginal_likelihood)
            record(value)
    posterior.prior_precision = hyper.prior_precision
    if tune_sigma:
        posterior.sigma_noise = hyper.sigma_noise
    return history


def lbfgs_tolerance(value: float, dtype: torch.dtype) -> float:
    """Gradient tolerance (largest entry, per unit of log δ or log σ) at which an evidence of
    size ``value`` is maximised to rounding: 1e-8 (float64) or 1e-6 (lower precision) times
    1 + |value|. Near the optimum the evidence lies below it by about ½ gᵀ H⁻¹ g, with H of the
    order of the number of parameters per δ: far below 1e-3 nats. (In float32 a gradient this
    small may be below the rounding of the evidence; the line search then stops L-BFGS.)"""
    return (1e-8 if dtype == torch.float64 else 1e-6) * (1.0 + abs(value))


def _lbfgs(objective: Objective, logs: list[Tensor], max_evals: int,
           record: Callable[[float], None], progress: bool) -> None:
    """Maximise objective(exp(log δ), exp(log σ)) over ``logs`` in place by L-BFGS."""
    bar = tqdm(total=max_evals, disable=not progress, desc="evidence (L-BFGS)")

    evaluated: list[list[Tensor]] = []  # the point of the last evaluation

    def evaluate() -> float:
        value = objective(logs[0].exp(), logs[1].exp() if len(logs) > 1 else None)
        grads = torch.autograd.grad(-value, logs)
        for p, g in zip(logs, grads):
            p.grad = g
        evaluated[:] = [[p.detach().clone() for p in logs]]
        return value.item()

    first = [evaluate()]  # its size sets the tolerance; L-BFGS's first call reuses it
    optimizer = torch.optim.LBFGS(
        logs, lr=1, max_iter=max_evals, max_eval=max_evals, history_size=20,
        tolerance_grad=lbfgs_tolerance(first[0], logs[0].dtype), tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        value = first.pop() if first else evaluate()
        record(value)
        bar.update()
        return torch.tensor(-value, dtype=logs[0].dtype)

    optimizer.step(closure)
    if not all(torch.equal(a, p) for a, p in zip(evaluated[0], logs)):
        record(evaluate())  # the line search ended on an earlier point: its value last
    bar.close()
