"""Bad inputs raise ValueError with a message that names the problem."""

import pytest
import torch

from marglik.structures import BlockDiagonal, Dense, Diagonal, Kronecker, LowRank


def _f64(*shape):
    return torch.rand(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(-1.0, dtype=torch.float64),
        torch.tensor(float("nan"), dtype=torch.float64),
    ],
)
def test_non_positive_scalar_delta(case, bad):
    J = torch.randn(2, case.p, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive"):
        case.block.logdet(1.0, bad)
    with pytest.raises(ValueError, match="positive"):
        case.block.inv_quad(J, 1.0, bad)


def test_non_positive_vector_delta(case):
    delta = case.expand(case.theta).clone()
    delta[-1] = 0.0
    with pytest.raises(ValueError, match="positive"):
        case.block.solve(torch.ones(case.p, dtype=torch.float64), 1.0, delta)


@pytest.mark.parametrize("shape_of", [lambda p: (p + 1,), lambda p: (p - 1,), lambda p: (2, p)])
def test_wrong_delta_shape(case, shape_of):
    delta = torch.ones(shape_of(case.p), dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        case.block.logdet(1.0, delta)


def test_wrong_input_shapes(case):
    p, delta = case.p, torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"last dimension {p}"):
        case.block.inv_quad(torch.ones(3, p + 1, dtype=torch.float64), 1.0, delta)
    with pytest.raises(ValueError, match=r"\(\.\.\., K"):
        case.block.inv_quad(torch.ones(p, dtype=torch.float64), 1.0, delta)
    with pytest.raises(ValueError, match="last dimension"):
        case.block.solve(torch.ones(2, p + 2, dtype=torch.float64), 1.0, delta)
    with pytest.raises(ValueError, match="last dimension"):
        case.block.matvec(torch.ones(p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"eps must have shape \(n"):
        case.block.sample(torch.ones(2, 2, p, dtype=torch.float64), 1.0, delta)


def test_bad_scale(case):
    delta = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-negative"):
        case.block.logdet(torch.tensor(-0.5, dtype=torch.float64), delta)
    with pytest.raises(ValueError, match="scalar"):
        case.block.logdet(torch.ones(2, dtype=torch.float64), delta)


def test_kronecker_rejects_per_parameter_delta():
    block = Kronecker(torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    delta = torch.full((6,), 0.5, dtype=torch.float64)
    delta[3] = 0.6
    msg = "KFAC blocks need one prior precision per block"
    for call in (
        lambda: block.logdet(1.0, delta),
        lambda: block.inv_quad(torch.ones(1, 6, dtype=torch.float64), 1.0, delta),
        lambda: block.sample(torch.ones(1, 6, dtype=torch.float64), 1.0, delta),
        lambda: block.precision_dense(1.0, delta),
    ):
        with pytest.raises(ValueError, match=msg):
            call()
    # Through a block diagonal: the Kronecker slice must be constant, the rest may vary.
    bd = BlockDiagonal([Diagonal(torch.ones(2, dtype=torch.float64)), block])
    ok = torch.cat(
        [torch.tensor([0.1, 0.2], dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)]
    )
    bd.logdet(1.0, ok)
    with pytest.raises(ValueError, match=msg):
        bd.logdet(1.0, torch.cat([ok[:2], delta]))


def test_constructor_validation():
    with pytest.raises(ValueError, match="square"):
        Dense(_f64(3, 4))
    with pytest.raises(ValueError, match="square"):
        Kronecker(_f64(2, 2), _f64(3, 2))
    with pytest.raises(ValueError, match="dtype"):
        Kronecker(_f64(2, 2), torch.eye(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="non-negative"):
        Diagonal(torch.tensor([1.0, -1e-3], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(p,\)"):
        Diagonal(_f64(2, 2))
    with pytest.raises(ValueError, match="match U"):
        LowRank(_f64(5, 2), _f64(3))
    with pytest.raises(ValueError, match="non-negative"):
        LowRank(_f64(5, 2), torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="exceeds"):
        LowRank(_f64(2, 3), _f64(3))
    with pytest.raises(ValueError, match="at least one"):
        BlockDiagonal([])
    with pytest.raises(ValueError, match="dtype and device"):
        BlockDiagonal([Diagonal(_f64(2)), Diagonal(torch.ones(2, dtype=torch.float32))])
