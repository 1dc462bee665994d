"""Learning an invariance by the evidence (LILA, Immer, van der Ouderaa et al., NeurIPS 2022).

The paper's illustrative toy, in 2-D: points on two noisy rings (radius 0.5: class 0, radius 1:
class 1) observed only on an arc of angles [0, 2] rad. The label is invariant to rotations about
the origin — the true invariance is full rotation. An MLP is averaged over S rotated copies of
its input with a learnable extent η (rotation angles ε·η, ε ~ U[−1, 1]), and η is learned by
the Laplace evidence during training (``marglik_training(hyperparameters=...)``, KFAC-reduce,
a differentiable refit per hyperparameter step). The rotation is a *generic* differentiable
augmentation (:class:`PointRotation` below, any module ``aug(x, S) -> (N, S, ...)``); for
images use :class:`marglik.layers.AffineAugmentation` the same way.

Expected: η grows to about π (full rotation) on the rings, and the learned model classifies
points at angles never seen in training; on a half-plane labelling, which rotations change,
η shrinks instead. Baselines: no augmentation, and Augerino (η by the training loss − λ|η|).

Run: ``PYTHONPATH=src python examples/learned_invariance.py`` (about a minute on one core).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

import marglik
from marglik.layers import AugmentedModel, fixed_nodes
from marglik.training.augerino import train_augerino


class PointRotation(nn.Module):
    """S rotations of 2-D points x (N, 2) by angles ε_s·η: (N, S, 2).

    ε ~ U[−1, 1] drawn afresh in training mode; in eval mode the fixed nodes of
    :func:`marglik.layers.fixed_nodes`, the same for every input (what the curvature fit needs).
    """

    def __init__(self, init: float):
        super().__init__()
        self.eta = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor, n_samples: int) -> Tensor:
        if self.training:
            eps = torch.rand(x.shape[0], n_samples, 1, dtype=x.dtype, device=x.device) * 2 - 1
        else:
            eps = fixed_nodes(n_samples, 1, 0, x.dtype, x.device).expand(x.shape[0], -1, -1)
        angle = (eps * self.eta)[..., 0]
        c, s = angle.cos(), angle.sin()
        u, v = x[:, None, 0], x[:, None, 1]
        return torch.stack([c * u - s * v, s * u + c * v], -1)


def rings(n: int, arc: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n points at angles U[0, arc] on the ring of radius 0.5 (class 0) or 1 (class 1),
    plus N(0, 0.05²) noise."""
    y = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.rand(n, generator=generator) * arc
    radius = torch.where(y == 0, 0.5, 1.0)
    x = torch.stack([angle.cos(), angle.sin()], 1) * radius[:, None]
    return x + 0.05 * torch.randn(n, 2, generator=generator), y


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 2))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


TRAINING = dict(hessian_structure="kron", laplace_kwargs={"kfac_approx": "reduce"},
                n_epochs=600, lr=3e-2, n_epochs_burnin=50, marglik_frequency=5,
                n_hypersteps=5, lr_hyp=5e-2)


def learn(x: Tensor, y: Tensor, init: float = 1.0) -> tuple[AugmentedModel, float, list]:
    """LILA: θ and η by the evidence; returns the model, its log evidence and η per epoch."""
    torch.manual_seed(0)
    model = AugmentedModel(mlp(), PointRotation(init), n_samples=16)
    la, model, history = marglik.marglik_training(
        model, [(x, y)], "classification", hyperparameters=model.hyperparameters(), **TRAINING)
    etas = [abs(h[0][0]) for h in history["hyperparameters"]]
    return model, la.log_marginal_likelihood().item(), etas


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = rings(100, 2.0, gen)
    x_test, y_test = rings(1000, 2 * math.pi, gen)  # the whole circle

    start = time.perf_counter()
    torch.manual_seed(0)
    plain = AugmentedModel(mlp(), PointRotation(0.0), n_samples=1)
    plain.augmentation.eta.requires_grad_(False)  # S = 1, η = 0: the MLP itself
    la, plain, _ = marglik.marglik_training(plain, [(x, y)], "classification", **TRAINING)
    print(f"no augmentation     log evidence {la.log_marginal_likelihood().item():7.2f}   "
          f"accuracy on the whole circle {accuracy(plain, x_test, y_test):.3f}   "
          f"({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    model, log_z, etas = learn(x, y)
    trace = ", ".join(f"{e:.2f}" for e in etas[::100])
    print(f"LILA (learned η)    log evidence {log_z:7.2f}   "
          f"accuracy on the whole circle {accuracy(model, x_test, y_test):.3f}   "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"  η every 100 epochs: {trace} → {etas[-1]:.2f} rad (full rotation: π = 3.14)")

    start = time.perf_counter()
    torch.manual_seed(0)
    augerino = AugmentedModel(mlp(), PointRotation(1.0), n_samples=16)
    train_augerino(augerino, [(x, y)], "classification", augerino.hyperparameters(),
                   n_epochs=600, lr=3e-2, lr_aug=5e-2, strength=0.01)
    print(f"Augerino (λ = 0.01)  η {augerino.augmentation.eta.abs().item():.2f} rad   "
          f"accuracy on the whole circle {accuracy(augerino, x_test, y_test):.3f}   "
          f"({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    half = (x[:, 0] > 0).long()  # a half-plane: rotations change the label
    _, log_z, etas = learn(x, half)
    print(f"half-plane labels   LILA η {etas[-1]:.2f} rad (from 1.00: rotations are not an "
          f"invariance here)   ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
