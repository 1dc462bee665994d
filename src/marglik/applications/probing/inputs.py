"""Probe inputs from frozen representations at sentence, token or pair level.

Every level ends as one row per labelled item, X (M, D') and class ids y (M,):

- ``"sentence"``: one label per sentence (or image, or any item); features (N, D), or token
  features (N, L, D) averaged over the tokens where ``mask`` is True (all tokens without a
  mask): x_n = Σ_l m_nl h_nl / Σ_l m_nl.
- ``"token"``: one label per token: features (N, L, D), labels (N, L); padding positions carry
  ``ignore_index`` (or ``mask`` False) and are dropped; x = h_nl.
- ``"pair"``: one label per pair of tokens of a sentence (dependency arcs, coreference):
  features (N, L, D), ``pairs`` (M, 3) rows (n, i, j), labels (M,). By default
  x = [h_ni ; h_nj] (concatenation, D' = 2D), as in ACL 2022's arc-label probes: it keeps the
  order of the two tokens (head vs dependent), adds no fixed nonlinearity that would hand a
  linear probe interactions it could not find itself, and leaves the products of the two
  tokens to the MLP probes, so the evidence of linear vs MLP families measures whether the task
  needs them. ``pair_combine="concat-product"`` appends h_ni ⊙ h_nj (D' = 3D) for users who
  want a bilinear probe from a linear family.

Labels may be integers or strings (any values ``numpy.unique`` sorts); they are encoded as
class ids 0..C−1 in sorted order (:func:`encode_labels`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LEVELS", "PAIR_COMBINE", "encode_labels", "probe_inputs"]

LEVELS = ("sentence", "token", "pair")
PAIR_COMBINE = ("concat", "concat-product")


def _features(features: Any) -> Tensor:
    """``features`` as a floating tensor, checked to be finite."""
    if not isinstance(features, Tensor):
        if isinstance(features, np.ndarray) or isinstance(features, (list, tuple)):
            features = torch.as_tensor(np.asarray(features))
        else:
            raise TypeError(f"features must be a tensor or an array, got "
                            f"{type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if features.numel() and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or infinite values")
    if features.dtype in (torch.float16, torch.bfloat16):  # probes train in float32 at least
        features = features.float()
    return features.detach()


def _labels(labels: Any) -> Tensor | np.ndarray:
    """``labels`` as an integer tensor, or a numpy array of strings / objects."""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class ids or strings, got {labels.dtype}")
        return labels.long()
    if not isinstance(labels, (np.ndarray, list, tuple)):
        raise TypeError(f"labels must be a tensor, an array or a list, got "
                        f"{type(labels).__name__}")
    array = np.asarray(labels)
    if array.dtype.kind in "iu":
        return torch.as_tensor(array.astype(np.int64))
    if array.dtype.kind in "USO":
        return array
    raise TypeError(f"labels must be integer class ids or strings, got dtype {array.dtype}")


def encode_labels(labels: Tensor | np.ndarray) -> tuple[list, Tensor]:
    """(sorted distinct values, class ids (M,) in 0..C−1) of 1-D ``labels``.

    Raises:
        ValueError: for fewer than two distinct labels (nothing to probe).
    """
    if isinstance(labels, Tensor):
        classes, ids = torch.unique(labels, sorted=True, return_inverse=True)
        classes = classes.tolist()
    else:
        classes, ids = np.unique(labels, return_inverse=True)
        classes, ids = classes.tolist(), torch.as_tensor(ids.reshape(-1), dtype=torch.long)
    if len(classes) < 2:
        raise ValueError(f"labels have {len(classes)} distinct value(s): a probe needs at least 2")
    return classes, ids


def _mask(mask: Any, shape: tuple[int, int]) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {shape} (sentences, tokens), got "
                         f"{tuple(mask.shape)}")
    return mask


def probe_inputs(
    features: Any,
    labels: Any,
    level: str = "sentence",
    *,
    pairs: Any = None,
    mask: Any = None,
    ignore_index: int = -100,
    pair_combine: str = "concat",
) -> tuple[Tensor, Tensor | np.ndarray]:
    """The rows a probe is trained on: (X (M, D'), labels (M,)), see the module docstring.

    Args:
        features: (N, D) or (N, L, D) representations (tensor or numpy array).
        labels: (N,) per sentence, (N, L) per token, (M,) per pair.
        level: ``"sentence" | "token" | "pair"``.
        pairs: (M, 3) integer rows (sentence n, token i, token j) for ``"pair"``.
        mask: (N, L) booleans, True at real tokens (sentence pooling, token level).
        ignore_index: the label of padding tokens at token level.
        pair_combine: ``"concat"`` or ``"concat-product"`` (pair level).

    Raises:
        ValueError / TypeError: naming the argument whose shape, type or values are wrong.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    features, labels = _features(features), _labels(labels)
    if pairs is not None and level != "pair":
        raise ValueError(f"pairs are used only with level='pair', not {level!r}")
    if level == "sentence":
        if features.ndim == 3:
            m = (torch.ones(features.shape[:2], dtype=torch.bool) if mask is None
                 else _mask(mask, tuple(features.shape[:2])))
            counts = m.sum(1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError("mask leaves a sentence without tokens to average")
            features = (features * m[..., None].to(features)).sum(1) / counts.to(features)
        elif mask is not None:
            raise ValueError("mask applies to (N, L, D) token features, not (N, D) features")
        if features.ndim != 2:
            raise ValueError(f"sentence-level features must be (N, D) or (N, L, D), got shape "
                             f"{tuple(features.shape)}")
        _same_length(features, labels, "sentences")
        return features, labels
    if features.ndim != 3:
        raise ValueError(f"{level}-level features must be (N, L, D) token features, got shape "
                         f"{tuple(features.shape)}")
    if level == "token":
        if tuple(labels.shape) != tuple(features.shape[:2]):
            raise ValueError(f"token-level labels must have shape {tuple(features.shape[:2])} "
                             f"(sentences, tokens), got {tuple(labels.shape)}")
        keep = (torch.as_tensor(labels != ignore_index) if isinstance(labels, Tensor)
                else torch.ones(labels.shape, dtype=torch.bool))
        if mask is not None:
            keep = keep & _mask(mask, tuple(features.shape[:2]))
        if isinstance(labels, Tensor):
            return features[keep], labels[keep]
        return features[keep], labels[keep.numpy()]
    if mask is not None:
        raise ValueError("mask is not used at pair level: give only the pairs to probe")
    if pair_combine not in PAIR_COMBINE:
        raise ValueError(f"pair_combine must be one of {PAIR_COMBINE}, got {pair_combine!r}")
    if pairs is None:
        raise ValueError("level='pair' needs pairs: (M, 3) rows (sentence, token i, token j)")
    pairs = torch.as_tensor(np.asarray(pairs) if not isinstance(pairs, Tensor) else pairs)
    if pairs.is_floating_point() or pairs.ndim != 2 or pairs.shape[1] != 3:
        raise ValueError(f"pairs must be an integer (M, 3) array of (sentence, i, j), got "
                         f"{pairs.dtype} of shape {tuple(pairs.shape)}")
    n, length = features.shape[:2]
    bounds = torch.tensor([n, length, length])
    if bool(((pairs < 0) | (pairs >= bounds)).any()):
        raise ValueError(f"pairs index outside the features: sentences must lie in [0, {n}), "
                         f"tokens in [0, {length})")
    pairs = pairs.long()
    _same_length(pairs, labels, "pairs")
    h_i, h_j = features[pairs[:, 0], pairs[:, 1]], features[pairs[:, 0], pairs[:, 2]]
    parts = [h_i, h_j] if pair_combine == "concat" else [h_i, h_j, h_i * h_j]
    return torch.cat(parts, dim=1), labels


def _same_length(rows: Tensor, labels: Tensor | np.ndarray, what: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != rows.shape[0]:
        raise ValueError(f"labels must have shape ({rows.shape[0]},), one per {what[:-1]}, got "
                         f"{tuple(labels.shape)}")
