"""Linear-algebra structures for curvature blocks and the posterior precision.

Each block stores a PSD curvature ``H_b`` for a contiguous slice of the flattened parameters and
computes, for ``P_b = scale · H_b + diag(delta)``, the log-determinant, batched quadratic forms
``J P_b⁻¹ Jᵀ``, solves, samples, and marginal variances — differentiably in ``scale`` and ``delta``,
reusing cached factorisations across hyperparameter steps.

Serialisation: ``block.state_dict()`` holds plain tensors including an ``int64`` type code
``"kind"`` (:data:`KIND_CODES`); :func:`block_from_state_dict` rebuilds any block from it.
"""

from marglik.structures.base import KIND_CODES, CurvatureBlock, block_from_state_dict
from marglik.structures.block_diagonal import BlockDiagonal
from marglik.structures.dense import Dense
from marglik.structures.diagonal import Diagonal
from marglik.structures.kronecker import Kronecker
from marglik.structures.lowrank import LowRank

__all__ = [
    "KIND_CODES",
    "BlockDiagonal",
    "CurvatureBlock",
    "Dense",
    "Diagonal",
    "Kronecker",
    "LowRank",
    "block_from_state_dict",
]
