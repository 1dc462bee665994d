"""Serialisation through torch.save / torch.load(weights_only=True), and dtype/device moves."""

import pytest
import torch
from torch.testing import assert_close

from marglik.structures import (
    KIND_CODES,
    BlockDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    block_from_state_dict,
)

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _roundtrip(sd, tmp_path):
    path = tmp_path / "block.pt"
    torch.save(sd, path)
    return torch.load(path, weights_only=True)


def test_state_dict_roundtrip(case, tmp_path):
    block = case.block
    scale = torch.tensor(1.3, dtype=torch.float64)
    delta = case.expand(case.theta)
    J = torch.randn(2, 3, case.p, dtype=torch.float64)
    before = (block.logdet(scale, delta), block.inv_quad(J, scale, delta))  # fills caches

    sd = block.state_dict()
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    assert int(sd["kind"]) == KIND_CODES[type(block).__name__]
    loaded = _roundtrip(sd, tmp_path)

    for rebuilt in (block_from_state_dict(loaded), type(block).from_state_dict(loaded)):
        assert type(rebuilt) is type(block)
        assert rebuilt.size == block.size
        assert_close(rebuilt.to_dense(), case.H, **TOL)
        assert_close(rebuilt.logdet(scale, delta), before[0], **TOL)
        assert_close(rebuilt.inv_quad(J, scale, delta), before[1], **TOL)


def test_nested_block_diagonal_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(3)
    inner = BlockDiagonal(
        [Diagonal(torch.rand(2, generator=g, dtype=torch.float64)) for _ in range(11)]
    )
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    outer = BlockDiagonal([inner, Kronecker(A @ A.T, torch.eye(2, dtype=torch.float64))])
    rebuilt = block_from_state_dict(_roundtrip(outer.state_dict(), tmp_path))
    assert isinstance(rebuilt, BlockDiagonal) and isinstance(rebuilt.blocks[0], BlockDiagonal)
    assert len(rebuilt.blocks[0].blocks) == 11  # "blocks.1." must not swallow "blocks.10."
    assert rebuilt.offsets == outer.offsets == [0, 22, 28]
    expected = torch.block_diag(
        *[b.to_dense() for b in inner.blocks],
        torch.kron(A @ A.T, torch.eye(2, dtype=torch.float64)),
    )
    assert_close(rebuilt.to_dense(), expected, **TOL)


def test_from_state_dict_rejects_other_kinds():
    sd = Diagonal(torch.ones(3, dtype=torch.float64)).state_dict()
    with pytest.raises(ValueError, match="kind"):
        Dense.from_state_dict(sd)
    with pytest.raises(ValueError, match="unknown block type code"):
        block_from_state_dict({**sd, "kind": torch.tensor(99)})
    with pytest.raises(ValueError, match="kind"):
        block_from_state_dict({"h": torch.ones(3)})


def test_to_dtype_and_device(case):
    block = case.block
    scale = torch.tensor(1.3, dtype=torch.float64)
    delta = case.expand(case.theta)
    expected = block.logdet(scale, delta)  # fills caches, which must move too
    single = block.to(torch.float32)
    assert single.dtype == torch.float32 and block.dtype == torch.float64
    assert single.to_dense().dtype == torch.float32
    out = single.logdet(scale.float(), delta.float())
    assert out.dtype == torch.float32
    assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    same = block.to(device="cpu", dtype=torch.float64)
    assert same.device == torch.device("cpu")
    assert_close(same.logdet(scale, delta), expected, **TOL)


def test_lowrank_state_keys():
    U, _ = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64))
    sd = LowRank(U, torch.ones(2, dtype=torch.float64)).state_dict()
    assert set(sd) == {"kind", "U", "s"}
