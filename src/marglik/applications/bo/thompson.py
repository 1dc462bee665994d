"""Thompson sampling with the linearised-Laplace surrogate: sample a function, then optimise it.

Kristiadi et al. (AABI 2023): draw f_s ~ the linearised posterior (a weight perturbation
θ_s − θ* pushed through the Jacobian, f_s(x) = f(x; θ*) + J(x)(θ_s − θ*)) and propose
x_s = argmax_x f_s(x). Since f_s is an explicit differentiable function of x, its maximiser is
found by gradient ascent like any acquisition function — no discretisation of the search space.
Needs ``botorch``.

S samples are optimised together: the objective Σ_s w ᵀ f_s(x_s) over the S points
(x_1..x_S) is separable, so one batched multi-start L-BFGS-B run of
:func:`botorch.optim.optimize_acqf` (q = S) returns every sample's maximiser.
"""

from __future__ import annotations

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.optim import optimize_acqf
from torch import Tensor

from marglik.applications.bo.surrogate import LaplaceSurrogate, StandardisedSamples


class FunctionSampleSum(AcquisitionFunction):
    """Σ_s wᵀ f_s(X[..., s, :]) for S fixed function samples: X (b, S, d) → (b,).

    Args:
        model: the surrogate the samples came from (BoTorch's bookkeeping only).
        samples: S function samples (:meth:`LaplaceSurrogate.function_samples`).
        weights: (m,) output weights of the scalar objective (default: the single output).
    """

    def __init__(self, model: LaplaceSurrogate, samples: StandardisedSamples,
                 weights: Tensor | None = None):
        super().__init__(model)
        m = model.num_outputs
        if weights is None:
            if m != 1:
                raise ValueError(f"the model has {m} outputs: give weights (m,) to scalarise")
            weights = torch.ones(1)
        weights = torch.as_tensor(weights)
        if weights.shape != (m,):
            raise ValueError(f"weights must have shape ({m},), got {tuple(weights.shape)}")
        self.samples = samples
        self.register_buffer("weights", weights.to(model.y_loc))

    def forward(self, X: Tensor) -> Tensor:
        return (self.samples.paired(X) @ self.weights.to(X)).sum(-1)


def thompson_candidates(model: LaplaceSurrogate, bounds: Tensor, n_candidates: int = 1,
                        weights: Tensor | None = None, num_restarts: int = 8,
                        raw_samples: int = 256, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Sample-then-optimise Thompson sampling: one maximiser per posterior function sample.

    Args:
        model: a fitted :class:`LaplaceSurrogate`.
        bounds: (2, d) box of the search space.
        n_candidates: S, the number of function samples (and candidates).
        weights: (m,) scalarisation of a multi-output model.
        num_restarts, raw_samples: multi-start settings of ``optimize_acqf``.
        generator: for reproducible function samples.

    Returns:
        candidates (S, d), x_s = argmax f_s within ``bounds``, and each sample's value there
        (S,).
    """
    if not isinstance(n_candidates, int) or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    bounds = torch.as_tensor(bounds)
    d = model.train_inputs.shape[-1]
    if bounds.shape != (2, d):
        raise ValueError(f"bounds must have shape (2, {d}), got {tuple(bounds.shape)}")
    samples = model.function_samples(n_candidates, generator)
    acq = FunctionSampleSum(model, samples, weights)
    X, _ = optimize_acqf(acq, bounds=bounds.to(model.train_inputs), q=n_candidates,
                         num_restarts=num_restarts, raw_samples=raw_samples)
    with torch.no_grad():
        values = samples.paired(X) @ acq.weights
    return X.detach(), values
