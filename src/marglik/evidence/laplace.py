"""The Laplace evidence (MacKay 1992; Immer et al., ICML 2021, eq. 5).

With θ* a mode of log p(D, θ), prior N(μ0, P0⁻¹) and posterior precision P = H/T + P0,

    log Z ≈ log p(D | θ*) − ½ (θ* − μ0)ᵀ P0 (θ* − μ0) − ½ (log det P − log det P0).

The posterior supplies the three terms (data fit, scatter, log-determinant ratio); keeping the sum
here makes the formula one obvious place, shared by every weight-space posterior.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["laplace_log_evidence"]


def laplace_log_evidence(log_likelihood: Tensor, scatter: Tensor, log_det_ratio: Tensor) -> Tensor:
    """log Z = log p(D|θ*) − ½ scatter − ½ log_det_ratio, all 0-d tensors."""
    return log_likelihood - 0.5 * scatter - 0.5 * log_det_ratio
