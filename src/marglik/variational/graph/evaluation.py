"""Linear evaluation of frozen node embeddings, and how well an uncertainty flags errors.

The protocol of contrastive representation learning (Veličković et al., "Deep Graph Infomax",
ICLR 2019, §4.2; GRACE): embeddings H are frozen, rows are L2-normalised, and a multinomial
logistic regression is fitted on k labelled nodes per class and scored on all other nodes. The
regression minimises (in float64, by L-BFGS)

    1/n Σ_{labelled n} −log softmax(W h_n + b)_{y_n} + (λ/2) ‖W‖²_F      (b not penalised),

which is scikit-learn's ``LogisticRegression(C = 1/(λ n))``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.errors import MarglikError
from marglik.metrics import ood_auroc

__all__ = ["LinearProbe", "binned_error_rate", "few_label_split", "fit_linear_probe",
           "misclassification_auroc"]


def few_label_split(y: Tensor, k: int, generator: torch.Generator | None = None,
                    ) -> tuple[Tensor, Tensor]:
    """Indices of k random nodes per class (train) and of all other nodes (test), sorted.

    Args:
        y: Integer labels ``(N,)``, classes 0..C−1.
        k: Labelled nodes per class; every class needs more than k nodes.
        generator: Source of the random choice.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MarglikError(f"k (labels per class) must be a positive integer, got {k!r}")
    if y.dim() != 1 or y.dtype.is_floating_point:
        raise MarglikError(f"labels must be an integer tensor of shape (N,), got {y.dtype} "
                           f"{tuple(y.shape)}")
    counts = torch.bincount(y)
    if (counts <= k).any():
        raise MarglikError(f"every class needs more than k={k} nodes; class sizes "
                           f"{counts.tolist()}")
    order = torch.randperm(y.numel(), generator=generator, device=y.device)
    ranked = y[order]
    # rank of each node within its class along the random order
    one_hot = F.one_hot(ranked, counts.numel())
    within = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    train = order[within < k].sort().values
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[train] = False
    return train, mask.nonzero().squeeze(1)


class LinearProbe(NamedTuple):
    """A fitted multinomial logistic regression: ``weight`` ``(C, D)``, ``bias`` ``(C,)``."""

    weight: Tensor
    bias: Tensor

    def probs(self, h: Tensor) -> Tensor:
        """Class probabilities ``(N, C)`` of L2-normalised embeddings ``h`` ``(N, D)``."""
        z = F.normalize(h.to(self.weight.dtype), dim=1)
        return torch.softmax(z @ self.weight.T + self.bias, dim=1)


def fit_linear_probe(h: Tensor, y: Tensor, n_classes: int, l2: float = 1e-2,
                     max_iter: int = 500) -> LinearProbe:
    """Fit the L2-regularised multinomial logistic regression of the module docstring.

    Args:
        h: Embeddings of the labelled nodes ``(n, D)`` (L2-normalised here).
        y: Their labels ``(n,)`` in ``[0, n_classes)``.
        n_classes: C.
        l2: λ ≥ 0.
        max_iter: L-BFGS iterations.
    """
    if h.dim() != 2 or y.shape != (h.shape[0],):
        raise MarglikError(f"embeddings (n, D) and labels (n,) must match, got "
                           f"{tuple(h.shape)} and {tuple(y.shape)}")
    if not l2 >= 0:
        raise MarglikError(f"l2 must be non-negative, got {l2!r}")
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise MarglikError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    z = F.normalize(h.detach().double(), dim=1)
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach(), b.detach())


def misclassification_auroc(uncertainty: Tensor, correct: Tensor) -> Tensor:
    """AUROC of ranking the wrongly classified nodes above the right ones by ``uncertainty``.

    1 = every error is more uncertain than every correct prediction, 0.5 = chance. Both
    arguments have shape ``(N,)``; ``correct`` is boolean and must contain both outcomes.
    """
    correct = correct.bool()
    if uncertainty.shape != correct.shape:
        raise MarglikError(f"uncertainty {tuple(uncertainty.shape)} and correct "
                           f"{tuple(correct.shape)} must have the same shape")
    if correct.all() or not correct.any():
        raise MarglikError("misclassification AUROC needs both right and wrong predictions")
    return ood_auroc(-uncertainty[correct], -uncertainty[~correct])


def binned_error_rate(uncertainty: Tensor, correct: Tensor, n_bins: int = 10,
                      ) -> tuple[Tensor, Tensor]:
    """Error rate against uncertainty in ``n_bins`` equal-count bins (sorted by uncertainty).

    Returns:
        (mean uncertainty per bin, error rate per bin), each ``(n_bins,)``.
    """
    if uncertainty.dim() != 1 or uncertainty.shape != correct.shape:
        raise MarglikError("uncertainty and correct must both have shape (N,)")
    if not 1 <= n_bins <= uncertainty.numel():
        raise MarglikError(f"n_bins must be in [1, {uncertainty.numel()}], got {n_bins}")
    order = uncertainty.argsort()
    bins = torch.tensor_split(order, n_bins)
    u = torch.stack([uncertainty[b].double().mean() for b in bins])
    err = torch.stack([(~correct[b].bool()).double().mean() for b in bins])
    return u, err
