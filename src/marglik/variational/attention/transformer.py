"""A small pre-norm transformer classifier whose attention is chosen by a factory.

``TransformerClassifier(..., attention=softmax_attention())`` is the deterministic model (with
``dropout > 0`` the MC-dropout one); ``attention=dirichlet_attention(...)`` gives Dirichlet
attention in every block. The input is a tensor of token ids, ``pad_id`` marking padding, so the
model is called as ``model(ids)`` like any classifier (the Laplace engine included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from marglik.errors import MarglikError
from marglik.variational.attention.layer import DirichletAttention, SelfAttention, SoftmaxAttention

__all__ = ["AttentionFactory", "TransformerClassifier", "dirichlet_attention", "softmax_attention"]

AttentionFactory = Callable[[int, int], SelfAttention]
"""(dim, heads) → a module with ``forward(x (N, L, E), padding_mask (N, L)) → (N, L, E)``."""


def softmax_attention(causal: bool = False, dropout: float = 0.0) -> AttentionFactory:
    """Factory of :class:`~.layer.SoftmaxAttention` (dropout on the rows for MC dropout)."""
    return lambda dim, heads: SoftmaxAttention(dim, heads, causal=causal, dropout=dropout)


def dirichlet_attention(prior_concentration: float = 1.0, link: str = "softplus",
                        floor: float = 1e-2, causal: bool = False) -> AttentionFactory:
    """Factory of :class:`~.layer.DirichletAttention` with these prior and link settings."""
    return lambda dim, heads: DirichletAttention(
        dim, heads, causal=causal, prior_concentration=prior_concentration, link=link, floor=floor)


class Block(nn.Module):
    """Pre-norm block: h + Drop(Attn(LN(h))), then h + Drop(MLP(LN(h))) (MLP E → 2E → E, GELU)."""

    def __init__(self, dim: int, heads: int, attention: AttentionFactory, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, padding_mask: Tensor | None) -> Tensor:
        h = h + self.drop(self.attn(self.norm1(h), padding_mask))
        return h + self.drop(self.mlp(self.norm2(h)))


class TransformerClassifier(nn.Module):
    """Token ids → class logits: embedding + learned positions, ``depth`` blocks, masked mean pool.

    Args:
        vocab_size: number of token ids (``pad_id`` included).
        n_classes: C.
        max_len: longest sequence (positions are learned up to it).
        dim, heads, depth: width E, heads H, number of blocks.
        attention: factory of the attention modules (:func:`softmax_attention`,
            :func:`dirichlet_attention`, or any ``(dim, heads) → module``).
        dropout: dropout after attention and in the MLPs (0: deterministic model).
        pad_id: the padding token; its positions are masked in attention and pooling, and a
            sequence of padding only is an error.

    Input ``ids`` ``(N, L)`` integer, L ≤ ``max_len``; output ``(N, C)`` logits.
    """

    def __init__(self, vocab_size: int, n_classes: int, max_len: int, dim: int = 32,
                 heads: int = 4, depth: int = 2, attention: AttentionFactory | None = None,
                 dropout: float = 0.0, pad_id: int = 0):
        super().__init__()
        if min(vocab_size, n_classes, max_len, depth) < 1:
            raise MarglikError("vocab_size, n_classes, max_len and depth must be positive")
        if not 0 <= pad_id < vocab_size:
            raise MarglikError(f"pad_id {pad_id} is not a token id in [0, {vocab_size})")
        attention = attention if attention is not None else softmax_attention()
        self.vocab_size, self.max_len, self.pad_id = vocab_size, max_len, pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise MarglikError(f"ids must be an integer tensor (N, L), got {ids.dtype} "
                               f"{tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise MarglikError(f"sequences of length {ids.shape[1]} exceed max_len {self.max_len}")
        checks = not torch._C._are_functorch_transforms_active()  # no .item() under vmap
        if checks and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise MarglikError(f"token ids must lie in [0, {self.vocab_size})")
        padding = ids == self.pad_id
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h, padding)
        keep = (~padding).to(h.dtype)[..., None]
        pooled = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)
