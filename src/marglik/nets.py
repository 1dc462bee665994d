"""Small network builders shared by the applications, the CLI and the examples."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """A fully connected network ``sizes[0] → sizes[1] → … → sizes[-1]``.

    ``nn.Linear`` layers with ``activation()`` between them (none after the last), created in
    order, so a fixed seed gives the same weights as building the layers by hand.

    Args:
        sizes: layer widths, input first; at least two.
        activation: module class applied after every layer but the last.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
