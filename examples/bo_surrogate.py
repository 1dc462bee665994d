"""Bayesian optimisation of Branin with the linearised-Laplace surrogate (needs BoTorch).

A ReLU MLP (2 → 50 → 50 → 1) trained on the observations, its KFAC Laplace posterior with a
layer-wise prior precision from the evidence, and the GLM predictive as a BoTorch ``Model``
(Kristiadi, Immer, Eschenhagen & Fortuin, AABI 2023). Ten iterations of LogEI, each refit
warm-started from the previous network, then one batch of sample-then-optimise Thompson
sampling. The functions are noiseless, so σ is fixed (0.05 in standardised units).

    pip install "marglik[bo]"
    python examples/bo_surrogate.py
"""

import sys
import warnings

import torch

try:
    from botorch.acquisition import LogExpectedImprovement
    from botorch.optim import optimize_acqf
    from botorch.test_functions import Branin
except ImportError:
    print("this example needs BoTorch: pip install 'marglik[bo]'")
    sys.exit(0)

from marglik.applications.bo import LaplaceSurrogate, thompson_candidates

torch.set_num_threads(1)  # small networks: one thread is fastest
# L-BFGS-B on a piecewise-linear (ReLU) surrogate often stops with scipy's ABNORMAL status and
# optimize_acqf retries with new starts; its warnings say so at every iteration
warnings.filterwarnings("ignore", category=RuntimeWarning, module="botorch")
torch.manual_seed(0)
branin = Branin().to(torch.float64)
lo, hi = branin.bounds.to(torch.float64)
unit = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


def objective(X):  # maximise −Branin on the unit square
    return -branin.evaluate_true(lo + (hi - lo) * X).unsqueeze(-1)


X = torch.rand(10, 2, dtype=torch.float64)
Y = objective(X)
model = LaplaceSurrogate(X, Y, noise_std=0.05, seed=0)
for i in range(10):
    acq = LogExpectedImprovement(model, best_f=Y.max())
    x, _ = optimize_acqf(acq, unit, q=1, num_restarts=5, raw_samples=256)
    y = objective(x)
    X, Y = torch.cat([X, x]), torch.cat([Y, y])
    model = model.condition_on_observations(x, y)  # warm start from the previous network
    print(f"iteration {i + 1:2d}: f = {-y.item():8.3f}, best = {-Y.max().item():.3f} "
          f"(optimum {branin.optimal_value:.3f})")
delta = model.laplace.prior_precision.tolist()
print("prior precision per weight tensor:", [f"{d:.2g}" for d in delta])

candidates, values = thompson_candidates(model, unit, n_candidates=4,
                                         generator=torch.Generator().manual_seed(0))
print("Thompson batch:", [round(-v, 3) for v in objective(candidates).reshape(-1).tolist()])
