"""The neural additive model f(x) = b + Σ_d f_d(x_d) + Σ_{(i,j)} f_ij(x_i, x_j).

Bouchiat, Immer, Yèche, Rätsch & Fortuin, "Laplace-Approximated Neural Additive Models:
Improving Interpretability with Bayesian Inference", AABI 2023 (after Agarwal et al., "Neural
Additive Models", NeurIPS 2021). All feature subnetworks f_d are one :class:`BlockMLP` with D
groups of input width 1; the pairwise subnetworks f_ij (second stage) another with K groups of
input width 2. ``contributions(x)`` returns every subnetwork's output (N, D + K, C), the model
output is their sum plus the bias b (C,).

Prior groups (:meth:`AdditiveNet.prior_groups`): one per feature subnetwork, one per pair
subnetwork, and one for the bias b, so the evidence learns a prior precision per subnetwork.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marglik.applications.additive.blocks import BlockMLP

__all__ = ["AdditiveNet"]


def _check_pairs(pairs: Sequence[Sequence[int]], n_features: int) -> list[tuple[int, int]]:
    out = []
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and 0 <= i < n_features for i in p) \
                or p[0] == p[1]:
            raise ValueError(f"pairs must be pairs of distinct feature indices in "
                             f"[0, {n_features}), got {tuple(p)!r}")
        out.append((int(p[0]), int(p[1])))
    if len(set(map(frozenset, out))) != len(out):
        raise ValueError(f"pairs must not repeat, got {out}")
    return out


class AdditiveNet(nn.Module):
    """b + Σ_d f_d(x_d) + Σ_k f_{i_k j_k}(x_{i_k}, x_{j_k}) with batched subnetworks.

    Args:
        n_features: D.
        hidden: hidden widths of every subnetwork, e.g. ``(32, 32)``.
        out_features: C (1 for regression and binary classification, 2 for the natural
            parameters of heteroscedastic regression).
        pairs: feature index pairs (i, j) that get an interaction subnetwork.
        activation: activation name (:data:`~marglik.applications.additive.blocks.ACTIVATIONS`).

    Shapes:
        x (N, D) -> (N, C).
    """

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 32), out_features: int = 1,
                 pairs: Sequence[Sequence[int]] = (), activation: str = "gelu"):
        super().__init__()
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self.n_features, self.hidden = n_features, tuple(hidden)
        self.out_features, self.activation = out_features, activation
        self.pairs = _check_pairs(pairs, n_features)
        self.features = BlockMLP(n_features, 1, self.hidden, out_features, activation)
        self.interactions = (BlockMLP(len(self.pairs), 2, self.hidden, out_features, activation)
                             if self.pairs else None)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("_pair_index", torch.tensor(self.pairs, dtype=torch.long)
                             .reshape(-1, 2), persistent=False)

    @property
    def n_groups(self) -> int:
        """D + K subnetworks."""
        return self.n_features + len(self.pairs)

    def contributions(self, x: Tensor) -> Tensor:
        """Every subnetwork's output at x (N, D): (N, D + K, C), features first, then pairs."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"AdditiveNet expects inputs (N, {self.n_features}), got "
                             f"{tuple(x.shape)}")
        out = self.features(x.unsqueeze(-1))
        if self.interactions is not None:
            out = torch.cat([out, self.interactions(x[:, self._pair_index])], dim=1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.contributions(x).sum(1) + self.bias

    def prior_groups(self) -> list[list[str]]:
        """Parameter-tensor names per prior group: features, then pairs, then ``["bias"]``."""
        groups = self.features.group_parameter_names("features.")
        if self.interactions is not None:
            groups += self.interactions.group_parameter_names("interactions.")
        return groups + [["bias"]]

    def group_of_parameters(self) -> Tensor:
        """The subnetwork of every entry of θ (``named_parameters`` order, flattened), (P,);
        the bias has index D + K."""
        where = {name: g for g, names in enumerate(self.prior_groups()) for name in names}
        sizes = [(where[n], p.numel()) for n, p in self.named_parameters()]
        return torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in sizes])

    def with_pairs(self, pairs: Sequence[Sequence[int]], seed: int = 0) -> AdditiveNet:
        """A new model with the same feature subnetworks and bias (copied) and fresh pair
        subnetworks for ``pairs`` (initialised from ``seed``; their last layer, weights and biases,
        is zero, so the
        new model computes the same function as this one)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            new = AdditiveNet(self.n_features, self.hidden, self.out_features, pairs,
                              self.activation)
        dtype = self.bias.dtype
        new = new.to(dtype=dtype, device=self.bias.device)
        new.features.load_state_dict(self.features.state_dict())
        with torch.no_grad():
            new.bias.copy_(self.bias)
            if new.interactions is not None:
                last = new.interactions.layers[-1]
                for t in (*last.weight, *last.bias):
                    t.zero_()
        return new
