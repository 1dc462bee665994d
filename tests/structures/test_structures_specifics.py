"""Structure-specific properties: cached factorisations, index conventions, square-root forms."""

import pytest
import torch
from torch.testing import assert_close

from marglik.structures import BlockDiagonal, Dense, Diagonal, Kronecker, LowRank

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _spd(n, seed):
    B = torch.randn(n, n + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return B @ B.T


@pytest.fixture
def factorisation_counter(monkeypatch):
    """Count calls of the O(p³) factorisations."""
    counts = {"eigh": 0, "eigvalsh": 0, "cholesky": 0}

    def wrap(name):
        original = getattr(torch.linalg, name)

        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)

    wrap("eigh")
    wrap("eigvalsh")
    wrap("cholesky")
    return counts


@pytest.mark.parametrize(
    "make", [lambda: Dense(_spd(6, 0)), lambda: Kronecker(_spd(2, 1), _spd(3, 2))]
)
def test_scalar_hyperparameter_steps_reuse_the_eigendecomposition(make, factorisation_counter):
    block = make()
    J = torch.randn(2, 3, 6, dtype=torch.float64)
    block.logdet(1.0, 1.0)
    block.inv_quad(J, 1.0, 1.0)
    first = dict(factorisation_counter)
    assert first["eigh"] >= 1
    for step in range(5):
        scale = torch.tensor(0.5 + step, dtype=torch.float64, requires_grad=True)
        delta = torch.tensor(0.1 * (step + 1), dtype=torch.float64, requires_grad=True)
        loss = block.logdet(scale, delta) + block.inv_quad(J, scale, delta).sum()
        loss = (
            loss + block.solve(J[0, 0], scale, delta).sum() + block.sample(J[0], scale, delta).sum()
        )
        loss.backward()
    assert factorisation_counter == first


def test_dense_vector_delta_uses_cholesky(factorisation_counter):
    block = Dense(_spd(4, 3))
    block.logdet(1.0, torch.rand(4, dtype=torch.float64) + 0.1)
    assert factorisation_counter == {"eigh": 0, "eigvalsh": 0, "cholesky": 1}


def test_dense_log_determinants_need_eigenvalues_only(factorisation_counter):
    """Evidence optimisation never pays for eigenvectors (eigvalsh is several times cheaper)."""
    H = _spd(5, 6)
    block = Dense(H)
    for delta in (0.5, 1.0, 2.0):
        expected = torch.linalg.slogdet(2.0 * H + delta * torch.eye(5, dtype=torch.float64))[1]
        assert_close(block.logdet(2.0, delta), expected, **TOL)
    assert factorisation_counter == {"eigh": 0, "eigvalsh": 1, "cholesky": 0}


def test_differentiable_curvature_is_not_cached():
    """A factor that requires grad gets a fresh decomposition per call (backward twice works)."""
    H = _spd(3, 4).requires_grad_(True)
    block = Dense(H)
    for _ in range(2):
        block.logdet(1.0, 0.5).backward()
    sign, expected = torch.linalg.slogdet(H.detach() + 0.5 * torch.eye(3, dtype=torch.float64))
    # d logdet(H + δI)/dH = (H + δI)⁻¹, accumulated twice.
    assert_close(
        H.grad, 2 * torch.linalg.inv(H.detach() + 0.5 * torch.eye(3, dtype=torch.float64)), **TOL
    )


def test_kronecker_row_major_weight_convention():
    """H vec(W) = vec(G W Aᵀ) with W (m × n) flattened row-major (index i·n + j)."""
    G, A = _spd(2, 5), _spd(3, 6)
    block = Kronecker(G, A)
    W = torch.randn(2, 3, dtype=torch.float64)
    assert_close(block.matvec(W.reshape(-1)), (G @ W @ A.T).reshape(-1), **TOL)
    assert (block.m, block.n, block.size) == (2, 3, 6)


def test_kronecker_prior_is_added_exactly_not_per_factor():
    """log det(G ⊗ A + δI) is exact, unlike log det((G + √δI) ⊗ (A + √δI)) (√δ per factor)."""
    G, A = _spd(2, 7), _spd(3, 8)
    block = Kronecker(G, A)
    delta = torch.tensor(0.9, dtype=torch.float64)
    exact = torch.linalg.slogdet(torch.kron(G, A) + delta * torch.eye(6, dtype=torch.float64))[1]
    approx = torch.linalg.slogdet(
        torch.kron(
            G + delta.sqrt() * torch.eye(2, dtype=torch.float64),
            A + delta.sqrt() * torch.eye(3, dtype=torch.float64),
        )
    )[1]
    out = block.logdet(1.0, delta)
    assert_close(out, exact, **TOL)
    assert (out - approx).abs() > 1e-3


def test_lowrank_vector_sample_is_the_qr_square_root():
    """The sample map is L = D^{-1/2}(I + QV((1+M)^{-1/2} − 1)VᵀQᵀ) with W = QR, R Rᵀ = V M Vᵀ.

    Here W = D^{-1/2} U (scale S)^{1/2}, built independently of the block.
    """
    g = torch.Generator().manual_seed(12)
    p, k = 8, 3
    U, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    s = torch.rand(k, generator=g, dtype=torch.float64) * 3
    D = torch.rand(p, generator=g, dtype=torch.float64) + 0.2
    scale = torch.tensor(2.5, dtype=torch.float64)
    W = D.rsqrt()[:, None] * U * torch.sqrt(scale * s)
    Q, R = torch.linalg.qr(W)
    M, V = torch.linalg.eigh(R @ R.T)
    QV = Q @ V
    L = torch.diag(D.rsqrt()) @ (
        torch.eye(p, dtype=torch.float64) + QV @ torch.diag((1 + M).rsqrt() - 1) @ QV.T
    )
    X = LowRank(U, s).sample(torch.eye(p, dtype=torch.float64), scale, D)
    assert_close(X, L.T, **TOL)
    P = scale * U @ torch.diag(s) @ U.T + torch.diag(D)
    assert_close(L @ L.T, torch.linalg.inv(P), **TOL)


def test_block_diagonal_layout():
    blocks = [
        Diagonal(torch.ones(2, dtype=torch.float64)),
        Dense(_spd(3, 9)),
        Kronecker(_spd(2, 10), _spd(2, 11)),
    ]
    bd = BlockDiagonal(blocks)
    assert bd.blocks == blocks and len(bd) == 3
    assert bd.offsets == [0, 2, 5, 9]
    assert bd.size == 9
    # A block only sees its own slice: perturbing another slice of v leaves it unchanged.
    v = torch.randn(9, dtype=torch.float64)
    w = v.clone()
    w[:2] += 1.0
    assert_close(bd.solve(v, 1.0, 0.5)[2:], bd.solve(w, 1.0, 0.5)[2:], **TOL)


@pytest.fixture
def nan_single_precision_eigh(monkeypatch):
    """LAPACK as seen with MKL on an exactly singular float32 factor: NaN in float32 only."""
    originals = {name: getattr(torch.linalg, name) for name in ("eigh", "eigvalsh")}

    def poisoned(name):
        def decompose(M):
            out = originals[name](M)
            if M.dtype != torch.float32:
                return out
            if name == "eigvalsh":
                return torch.full_like(out, float("nan"))
            return type(out)((out[0], torch.full_like(out[1], float("nan"))))
        return decompose

    for name in originals:
        monkeypatch.setattr(torch.linalg, name, poisoned(name))


@pytest.mark.usefixtures("nan_single_precision_eigh")
def test_a_non_finite_float32_eigendecomposition_is_redone_in_float64():
    G, A = _spd(2, 1), _spd(3, 2)
    A[0], A[:, 0] = 0.0, 0.0  # exactly singular, as a factor with always-zero inputs
    expected = torch.logdet(torch.kron(G, A) + 0.5 * torch.eye(6, dtype=torch.float64))
    for block, reference in [(Kronecker(G.float(), A.float()), expected),
                             (Dense(torch.kron(G, A).float()), expected)]:
        got = block.logdet(torch.tensor(1.0), torch.tensor(0.5))
        assert got.dtype == torch.float32
        assert_close(got.double(), reference, rtol=1e-5, atol=0)
    evals, evecs = Kronecker(G.float(), A.float()).eig()[2:]
    assert evals.dtype == torch.float32 and bool(torch.isfinite(evecs).all())


def test_an_eigendecomposition_of_non_finite_entries_names_the_problem():
    from marglik.structures.base import sym_eigh

    M = _spd(3, 0)
    M[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite entries"):
        sym_eigh(M)
