"""Structure test cases: each builds a block and, independently, its dense oracle.

A case holds the block, the dense curvature ``H`` built *without* the block (``torch.kron``,
``U diag(s) Uᵀ``, ``torch.block_diag`` of the oracles), and how a vector prior precision is
parameterised for it: ``expand(theta)`` maps free parameters to the ``(p,)`` delta (identity for
structures that accept per-parameter priors; one value repeated over a Kronecker block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from marglik.structures import BlockDiagonal, CurvatureBlock, Dense, Diagonal, Kronecker, LowRank

DTYPE = torch.float64


@dataclass
class Case:
    name: str
    block: CurvatureBlock
    H: Tensor  # dense oracle of the curvature, built independently of the block
    theta: Tensor  # free parameters of a vector prior precision
    expand: Callable[[Tensor], Tensor]  # theta -> (p,) delta

    @property
    def p(self) -> int:
        return self.H.shape[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psd(n: int, rank: int, g: torch.Generator) -> Tensor:
    B = torch.randn(n, rank, generator=g, dtype=DTYPE)
    return B @ B.T


def _positive(n: int, g: torch.Generator) -> Tensor:
    return 0.3 + torch.rand(n, generator=g, dtype=DTYPE) * 2.0


def _identity(theta: Tensor) -> Tensor:
    return theta


def _dense(rank: int, seed: int) -> Case:
    g = _gen(seed)
    H = _psd(5, rank, g)
    return Case(f"dense_rank{rank}", Dense(H), H, _positive(5, g), _identity)


def _diagonal(with_zeros: bool, seed: int) -> Case:
    g = _gen(seed)
    h = torch.rand(6, generator=g, dtype=DTYPE) * 3.0
    if with_zeros:
        h[[1, 4]] = 0.0
    name = "diagonal_zeros" if with_zeros else "diagonal"
    return Case(name, Diagonal(h), torch.diag(h), _positive(6, g), _identity)


def _kron_parts(g: torch.Generator, m: int, n: int, rank_g: int) -> tuple[Tensor, Tensor]:
    return _psd(m, rank_g, g), _psd(n, n + 1, g)


def _kronecker(m: int, n: int, rank_g: int, seed: int) -> Case:
    g = _gen(seed)
    G, A = _kron_parts(g, m, n, rank_g)
    p = m * n
    theta = _positive(1, g)
    return Case(
        f"kron_{m}x{n}_rank{rank_g}",
        Kronecker(G, A),
        torch.kron(G, A),
        theta,
        lambda t: t.expand(p),
    )


def _lowrank_parts(g: torch.Generator, p: int, k: int, zero: bool) -> tuple[Tensor, Tensor]:
    U, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=DTYPE))
    s = torch.rand(k, generator=g, dtype=DTYPE) * 4.0 + 0.5
    if zero:
        s[1] = 0.0
    return U, s


def _lowrank(zero: bool, seed: int) -> Case:
    g = _gen(seed)
    U, s = _lowrank_parts(g, 7, 3, zero)
    H = U @ torch.diag(s) @ U.T
    name = "lowrank_deficient" if zero else "lowrank"
    return Case(name, LowRank(U, s), H, _positive(7, g), _identity)


def _block_diagonal(seed: int) -> Case:
    g = _gen(seed)
    Hd = _psd(4, 2, g)
    G, A = _kron_parts(g, 2, 3, 1)
    h = torch.rand(3, generator=g, dtype=DTYPE)
    U, s = _lowrank_parts(g, 5, 2, False)
    blocks = [Dense(Hd), Kronecker(G, A), Diagonal(h), LowRank(U, s)]
    H = torch.block_diag(Hd, torch.kron(G, A), torch.diag(h), U @ torch.diag(s) @ U.T)
    # Per-parameter prior everywhere except the Kronecker slice (4:10), which gets one value.
    theta = _positive(4 + 1 + 3 + 5, g)

    def expand(t: Tensor) -> Tensor:
        return torch.cat([t[:4], t[4:5].expand(6), t[5:]])

    return Case("block_diagonal", BlockDiagonal(blocks), H, theta, expand)


CASE_BUILDERS: dict[str, Callable[[], Case]] = {
    "dense_full": lambda: _dense(7, 1),
    "dense_deficient": lambda: _dense(2, 2),
    "diagonal": lambda: _diagonal(False, 3),
    "diagonal_zeros": lambda: _diagonal(True, 4),
    "kron": lambda: _kronecker(3, 4, 4, 5),
    "kron_deficient": lambda: _kronecker(3, 2, 1, 6),
    "kron_bias": lambda: _kronecker(3, 1, 3, 7),
    "lowrank": lambda: _lowrank(False, 8),
    "lowrank_deficient": lambda: _lowrank(True, 9),
    "block_diagonal": lambda: _block_diagonal(10),
}


@pytest.fixture(params=list(CASE_BUILDERS))
def case(request: pytest.FixtureRequest) -> Case:
    return CASE_BUILDERS[request.param]()


@pytest.fixture(params=["scalar", "vector"])
def delta_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass
class Problem:
    """A case with hyperparameters and the dense oracles of ``P`` and ``P⁻¹``."""

    case: Case
    kind: str  # "scalar" | "vector"
    scale: Tensor  # 0-d, != 1
    theta: Tensor  # free prior parameters: 0-d for "scalar", case.theta for "vector"
    delta: Tensor  # what the block receives: 0-d or (p,)
    P: Tensor
    Sigma: Tensor

    def delta_of(self, theta: Tensor) -> Tensor:
        return theta if self.kind == "scalar" else self.case.expand(theta)


@pytest.fixture
def problem(case: Case, delta_kind: str) -> Problem:
    scale = torch.tensor(1.7, dtype=DTYPE)
    theta = torch.tensor(0.8, dtype=DTYPE) if delta_kind == "scalar" else case.theta.clone()
    delta = theta if delta_kind == "scalar" else case.expand(theta)
    P = scale * case.H + torch.diag(delta.expand(case.p))
    return Problem(case, delta_kind, scale, theta, delta, P, torch.linalg.inv(P))
