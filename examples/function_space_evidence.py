"""The evidence in function space: the exact "kernel" structure and data-partitioned bounds.

On sklearn's digits (1,257 training images) with an MLP 64-32-10 (2,410 parameters):

1. ``hessian_structure="kernel"`` keeps the exact GGN as its N·C per-output rows; its evidence is
   the function-space form log det(I + Λ^½ J P0⁻¹ Jᵀ Λ^½) and equals the full GGN's.
2. ``marglik.evidence.PartitionedEvidence``: the evidence bounded from below by partitions of
   M images (random or grouped by class), tighter for larger M and for class groups.
3. The prior precision learned from the stochastic estimate of the bound (one partition per
   Adam step) against the exact evidence's optimum.

Printed on 2026-12-05 (2-core AMD EPYC, one thread, 86 s): both structures give δ* = 1.2390 and
log Z = −394.8921 ("kernel" takes 16 s against 5 s here: the data have N·C = 12,570 outputs, more
than the 2,410 parameters); bounds −840.8 / −632.1 (random partitions of 50 / 200) and
−706.2 / −557.9 (grouped by class); δ = 2.85 from the stochastic bound, near its own optimum
2.63 but above the exact 1.24: with partitions of 50 the bound favours a stronger prior.

    python examples/function_space_evidence.py
"""

import time

import torch
from torch import nn

import marglik
from marglik.data import load_digits_split
from marglik.evidence import HyperparameterStep, PartitionedEvidence
from marglik.training import train_map

torch.set_num_threads(1)
torch.manual_seed(0)
X, y, _, _ = load_digits_split(flatten=True)
X = X.double()
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
train_map(model, [(X, y)], "classification", n_epochs=300, lr=1e-2, prior_precision=1.0)

for structure in ("full", "kernel"):
    t0 = time.perf_counter()
    la = marglik.Laplace(model, "classification", hessian_structure=structure).fit([(X, y)])
    la.optimize_prior_precision(method="marglik", optimizer="lbfgs")
    print(f"{structure:>6}: δ* = {la.prior_precision.item():.4f}, "
          f"log Z = {la.log_marginal_likelihood().item():.4f} ({time.perf_counter() - t0:.1f} s)")

delta = la.prior_precision.clone()
exact = la.log_marginal_likelihood(delta).item()
for order in ("random", "class"):
    perm = torch.argsort(y, stable=True) if order == "class" else torch.randperm(len(y))
    for m in (50, 200):
        parts = [[(X[perm[i:i + m]], y[perm[i:i + m]])] for i in range(0, len(y), m)]
        bound = PartitionedEvidence(la, parts, structure="kernel")
        print(f"bound, {order:>6} partitions of {m:>3}: {bound(delta).item():.1f} "
              f"(exact {exact:.1f})")

# learn δ from the stochastic bound: one random partition of 50 per step
parts = [[(X[i:i + 50], y[i:i + 50])] for i in range(0, len(y), 50)]
bound = PartitionedEvidence(la, parts, structure="kernel")
step = HyperparameterStep(torch.zeros((), dtype=torch.float64), lr=0.05)
g = torch.Generator().manual_seed(0)
for _ in range(300):
    step.step(lambda d, s: bound(d, sample=1, generator=g))
best = torch.logspace(-1, 1, 201, dtype=torch.float64)
print(f"δ from the stochastic bound: {step.prior_precision.item():.3f}; argmax of the bound on a "
      f"grid: {best[torch.stack([bound(d) for d in best]).argmax()].item():.3f}; exact δ* "
      f"{delta.item():.3f}")
