"""Learned affine augmentation of images and the model averaged over augmented copies.

Immer, van der Ouderaa, Rätsch, Fortuin & van der Wilk, "Invariance Learning in Deep Neural
Networks with Differentiable Laplace Approximations" (LILA), NeurIPS 2022, §3
(../shared/docs/methods.md §5). The invariant model averages the network's outputs (logits)
over S transformed copies of the input,

    f_η(x) = 1/S Σ_s g(T(x; ε_s ⊙ η)),   ε_s ~ U[−1, 1]^k,
    T(·; t) = expm(Σ_j t_j G_j)  applied with ``affine_grid`` + ``grid_sample``,

with G_j the affine Lie algebra generators (x/y translation, rotation, x/y scale, shear) and
η ≥ 0 their extents; η = 0 is no invariance. η is a tensor, so the Laplace evidence is
differentiable in it through the data fit and the curvature.

Pure functions for the maths (:func:`lie_algebra`, :func:`affine_matrices`, :func:`warp`,
:func:`fixed_nodes`), :class:`AffineAugmentation` (the module with η) and
:class:`AugmentedModel` (the average). Any module with the :class:`Augmentation` call signature
plugs into :class:`AugmentedModel` in place of the affine one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the six generators, in this order; entries (row, column) = value of the 3×3 Lie algebra
#: element in normalised (x, y, 1) coordinates of ``affine_grid``
GENERATORS: dict[str, tuple[tuple[int, int, float], ...]] = {
    "translate_x": ((0, 2, 1.0),),
    "translate_y": ((1, 2, 1.0),),
    "rotate": ((0, 1, -1.0), (1, 0, 1.0)),
    "scale_x": ((0, 0, 1.0),),
    "scale_y": ((1, 1, 1.0),),
    "shear": ((0, 1, 1.0), (1, 0, 1.0)),
}
GENERATOR_NAMES = tuple(GENERATORS)
MODES = ("auto", "random", "fixed")

#: irrational offsets of the fixed nodes per seed (√2, √3, √5, √7, √11, √13, fractional parts)
_SEED_STEPS = tuple(math.sqrt(p) % 1.0 for p in (2, 3, 5, 7, 11, 13))


class Augmentation(Protocol):
    """A differentiable augmentation: ``augmentation(x, n_samples) -> (N, S, *input shape)``.

    Any ``nn.Module`` with this call (its parameters the learnable augmentation parameters)
    can replace :class:`AffineAugmentation` in :class:`AugmentedModel`. For a fit of the
    curvature, whose passes (batched and per sample) must see the same copies, its copies in
    eval mode must depend only on the input itself, not on a random draw per call or on the
    other inputs of the batch.
    """

    def __call__(self, x: Tensor, n_samples: int) -> Tensor: ...


def check_generators(generators: Sequence[str]) -> tuple[str, ...]:
    """The generator names as a tuple, checked: known, distinct, at least one."""
    if isinstance(generators, str):
        generators = (generators,)
    names = tuple(generators)
    bad = [g for g in names if not isinstance(g, str)]
    if bad:
        raise TypeError(f"generator names must be strings, got {bad!r}")
    unknown = [g for g in names if g not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown generators {unknown}: use some of {GENERATOR_NAMES}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give each generator at most once and at least one, got {list(names)}")
    return names


def lie_algebra(generators: Sequence[str], height: int, width: int, dtype: torch.dtype,
                device: torch.device | None = None) -> Tensor:
    """Generators G_j (k, 3, 3) in the normalised coordinates of ``affine_grid``.

    Translations are in normalised units (1 = half the image). The linear parts are defined
    in pixel geometry and conjugated into normalised coordinates, G ↦ D⁻¹ G D with
    D = diag(W, H), so that a rotation rotates the pixels of a non-square image too.
    """
    G = torch.zeros(len(generators), 3, 3, dtype=torch.float64)
    for j, name in enumerate(generators):
        for row, col, value in GENERATORS[name]:
            G[j, row, col] = value
    D = torch.diag(torch.tensor([float(width), float(height), 1.0], dtype=torch.float64))
    linear = torch.linalg.solve(D[:2, :2], G[:, :2, :2]) @ D[:2, :2]
    G[:, :2, :2] = linear
    return G.to(dtype=dtype, device=device)


def affine_matrices(eps: Tensor, eta: Tensor, G: Tensor) -> Tensor:
    """T = expm(Σ_j ε_j η_j G_j)[:2] for ε (..., k), η (k,), G (k, 3, 3): (..., 2, 3)."""
    A = torch.einsum("...k,kij->...ij", eps * eta, G)
    return torch.linalg.matrix_exp(A)[..., :2, :]


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """x (B, C, H, W) resampled at ``affine_grid(θ)`` for θ (B, 2, 3): bilinear, zero padding,
    ``align_corners=False`` (pixel centres; the identity maps every pixel onto itself)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fixed_nodes(n_samples: int, k: int, seed: int, dtype: torch.dtype,
                device: torch.device | None = None) -> Tensor:
    """Deterministic ε (S, k) in [−1, 1): the additive recurrence of Roberts' R_k sequence,
    u_s = frac(u_0 + s·α) with α_j = φ_k^−(j+1) (φ_k the root of x^(k+1) = x + 1), shifted by
    a seed-dependent u_0 (a Cranley–Patterson rotation). Low-discrepancy, so a good S-point
    quadrature of U[−1, 1]^k, and made of plain arithmetic (it runs inside ``torch.func``
    transforms, which refuse random draws)."""
    if k > len(_SEED_STEPS):
        raise ValueError(f"at most {len(_SEED_STEPS)} generators, got {k}")
    phi = 2.0
    for _ in range(64):  # fixed point of x = (1 + x)^(1/(k+1))
        phi = (1.0 + phi) ** (1.0 / (k + 1))
    alpha = torch.tensor([phi ** -(j + 1) for j in range(k)], dtype=torch.float64)
    u0 = torch.tensor([(0.5 + seed * _SEED_STEPS[j]) % 1.0 for j in range(k)],
                      dtype=torch.float64)
    s = torch.arange(n_samples, dtype=torch.float64)[:, None]
    return (2 * torch.frac(u0 + s * alpha) - 1).to(dtype=dtype, device=device)


class AffineAugmentation(nn.Module):
    """S affine copies T(x; ε_s ⊙ η) of image batches, η ≥ 0 learnable (LILA, NeurIPS 2022).

    Args:
        generators: which of :data:`GENERATOR_NAMES` to use (default all six); the others stay
            fixed at 0.
        init: initial extents η, one value for all or one per generator, finite and ≥ 0.
            Rotation extent π is full rotation; translations are in half-image units, scales and
            shear in log units.
        mode: ``"random"`` — ε ~ U[−1, 1]^k drawn from torch's global RNG, independently per
            input and copy (training, as the paper); ``"fixed"`` — the same S deterministic nodes
            (:func:`fixed_nodes` with ``seed``) for every input, so the augmented model is a
            deterministic function of x and η (reproducible evaluation, and the curvature fit's
            passes see the same copies); ``"auto"`` (default) — random in training mode, fixed in
            eval mode.
        seed: the seed of the fixed nodes.

    Attributes:
        eta: the extents η (k,), an ``nn.Parameter``. ε is symmetric, so η and −η give the same
            distribution of copies; η is used as it is (not |η|, whose gradient vanishes at 0).

    Input (N, C, H, W) of any size, output (N, S, C, H, W). With η = 0 every copy is exactly x:
    each copy is x + (warp(x, T_s) − warp(x, I)), which differs from warp(x, T_s) only by the
    rounding error of the identity resampling and keeps every gradient.
    """

    def __init__(self, generators: Sequence[str] = GENERATOR_NAMES,
                 init: float | Sequence[float] | Tensor = 0.0, mode: str = "auto",
                 seed: int = 0):
        super().__init__()
        self.generators = check_generators(generators)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.mode, self.seed = mode, seed
        eta = torch.as_tensor(init, dtype=torch.get_default_dtype()).detach().clone()
        k = len(self.generators)
        if eta.ndim == 0:
            eta = eta.expand(k).clone()
        if eta.shape != (k,):
            raise ValueError(f"init must be one value or one per generator ({k}), got shape "
                             f"{tuple(eta.shape)}")
        if not torch.isfinite(eta).all() or (eta < 0).any():
            raise ValueError(f"the extents η must be finite and non-negative, got {eta.tolist()}")
        self.eta = nn.Parameter(eta)

    @property
    def extent(self) -> dict[str, float]:
        """|η| per generator."""
        return dict(zip(self.generators, self.eta.detach().abs().tolist()))

    def sampling(self) -> str:
        """``"random"`` or ``"fixed"``: how ε is drawn now (``"auto"`` follows ``training``)."""
        if self.mode == "auto":
            return "random" if self.training else "fixed"
        return self.mode

    def epsilon(self, n: int, n_samples: int, like: Tensor) -> Tensor:
        """ε (N, S, k) in [−1, 1], random or the fixed nodes (see ``mode``)."""
        k = len(self.generators)
        if self.sampling() == "random":
            u = torch.rand(n, n_samples, k, dtype=like.dtype, device=like.device)
            return 2 * u - 1
        return fixed_nodes(n_samples, k, self.seed, like.dtype, like.device).expand(n, -1, -1)

    def forward(self, x: Tensor, n_samples: int) -> Tensor:
        """x (N, C, H, W) -> S transformed copies (N, S, C, H, W)."""
        check_images(x)
        n_samples = check_n_samples(n_samples)
        N, C, H, W = x.shape
        G = lie_algebra(self.generators, H, W, x.dtype, x.device)
        eps = self.epsilon(N, n_samples, x)
        theta = affine_matrices(eps, self.eta.to(x.dtype), G).reshape(N * n_samples, 2, 3)
        copies = x.unsqueeze(1).expand(N, n_samples, C, H, W).reshape(N * n_samples, C, H, W)
        warped = warp(copies, theta).reshape(N, n_samples, C, H, W)
        identity = torch.eye(3, dtype=x.dtype, device=x.device)[:2].expand(N, 2, 3)
        rounding = x - warp(x, identity)  # zero up to rounding: makes η = 0 exactly x
        return warped + rounding.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"generators={self.generators}, mode={self.mode!r}, seed={self.seed}"


class AugmentedModel(nn.Module):
    """f(x) = 1/S Σ_s net(x_s), the network's outputs averaged over S augmented copies.

    Args:
        net: the network g, called on the copies flattened to (N·S, ...) (copies of input n in
            rows n·S … n·S + S − 1).
        augmentation: ``augmentation(x, S) -> (N, S, ...)`` (:class:`Augmentation`), e.g.
            :class:`AffineAugmentation`; its parameters are the hyperparameters.
        n_samples: S ≥ 1.

    For the curvature engine, :attr:`copies_per_input` declares that registered layers inside
    that see N·S rows see S copies of each input whose outputs are averaged
    (``marglik.curvature.copies``): KFAC then reduces or expands over them. For a Laplace
    approximation over the weights only, give ``subset_of_weights="subnetwork",
    subnetwork=["net"]`` (the augmentation's parameters then stay hyperparameters, e.g. for
    ``fit(create_graph=True)`` or ``marglik_training(hyperparameters=...)``).
    """

    def __init__(self, net: nn.Module, augmentation: nn.Module, n_samples: int):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if not isinstance(augmentation, nn.Module):
            raise TypeError(f"augmentation must be an nn.Module, got {type(augmentation).__name__}")
        self.net, self.augmentation = net, augmentation
        self.n_samples = check_n_samples(n_samples)

    @property
    def copies_per_input(self) -> int:
        """S: the protocol the curvature engine reads (``marglik.curvature.copies``)."""
        return self.n_samples

    def hyperparameters(self) -> list[Tensor]:
        """The augmentation's parameters (η), to learn by the evidence."""
        return list(self.augmentation.parameters())

    def forward(self, x: Tensor) -> Tensor:
        """x (N, ...) -> mean over the S copies of net(copy): (N, *net output shape)."""
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError("AugmentedModel needs a tensor input with a batch dimension")
        N, S = x.shape[0], self.n_samples
        copies = self.augmentation(x, S)
        if not isinstance(copies, Tensor) or copies.dim() < 2 or tuple(copies.shape[:2]) != (N, S):
            shape = tuple(copies.shape) if isinstance(copies, Tensor) else type(copies).__name__
            raise ValueError(f"the augmentation must return (N, S, ...) = ({N}, {S}, ...), "
                             f"got {shape}")
        g = self.net(copies.reshape(N * S, *copies.shape[2:]))
        return g.reshape(N, S, *g.shape[1:]).mean(1)

    def extra_repr(self) -> str:
        return f"n_samples={self.n_samples}"


def check_images(x: Tensor) -> None:
    """x must be a floating (N, C, H, W) tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"the input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"affine augmentation needs images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"the images must be floating point, got {x.dtype}")


def check_n_samples(n_samples: int) -> int:
    """S must be a positive int."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    return n_samples
