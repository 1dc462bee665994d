"""Multiply-adds per input of the layer-wise GLM predictive against one forward + backward.

    python benchmarks/predictive_floor.py [--models resnet18 resnet50] [--columns 9]

Counts, for the ResNets of ``benchmarks/resnet.py`` on one 3×32×32 input, the multiply-adds of
each part of the exact KFAC predictive with K output columns (C − 1 = 9 for the centred softmax
logits), on the paths that :mod:`marglik.posterior.layerwise_covariance` picks, and of one
forward + backward (forward, input gradients, weight gradients). Nothing is timed; the lower
bound is forward + K backward passes + K weight-gradient-sized products per input.
"""

from __future__ import annotations

import argparse
import json

import torch
from resnet import MODELS
from torch import nn

from marglik.posterior.layerwise_covariance import (
    pairs_first,
    rotate_gradients_first,
    rotate_inputs_first,
)


def layer_shapes(model: nn.Module) -> list[tuple[int, int, int, bool]]:
    """(positions R, D_out m, D_in n, is the first layer) of every Conv2d / Linear, one input."""
    shapes: list[tuple[int, int, int, bool]] = []

    def hook(m, args, out):
        if isinstance(m, nn.Conv2d):
            n = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            shapes.append((out.shape[2] * out.shape[3], m.out_channels, n, m.in_channels == 3))
        else:
            shapes.append((1, m.out_features, m.in_features, False))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return shapes


def counts(shapes: list[tuple[int, int, int, bool]], K: int) -> dict[str, float]:
    """Multiply-adds per input of each part (see the module docstring)."""
    forward = sum(R * m * n for R, m, n, _ in shapes)
    input_grads = sum(R * m * n for R, m, n, first in shapes if not first)
    parts = {"forward": forward, "column backward passes": K * input_grads,
             "G-side rotations": 0, "A-side rotations": 0, "Jacobians or pair products": 0,
             "contractions": 0}
    for R, m, n, _ in shapes:
        g_first = R == 1 or pairs_first(K, R) or rotate_gradients_first(R, n)
        parts["G-side rotations"] += K * m * m * (R if g_first else n)
        if R == 1:
            parts["A-side rotations"] += n * n
            parts["contractions"] += K * K * m + m * n
        elif pairs_first(K, R):
            parts["A-side rotations"] += R * n * n
            parts["Jacobians or pair products"] += (R * (R + 1) // 2) * (m * n + n)
            parts["contractions"] += K * K * R * m
        else:
            rotate = R * n * n if rotate_inputs_first(K, R, m, n) else K * m * n * n
            parts["A-side rotations"] += rotate
            parts["Jacobians or pair products"] += K * R * m * n
            parts["contractions"] += K * K * m * n
    parts["total"] = sum(parts.values())
    parts["fwd+bwd"] = 2 * forward + input_grads
    parts["lower bound"] = forward + K * input_grads + K * forward
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=list(MODELS))
    parser.add_argument("--columns", type=int, default=9, help="K output columns")
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    for name in args.models:
        c = counts(layer_shapes(MODELS[name](args.width).eval()), args.columns)
        fb = c["fwd+bwd"]
        print(json.dumps({"model": name, "columns": args.columns,
                          "gmac": {k: round(v / 1e9, 3) for k, v in c.items()},
                          "over_fwd_bwd": {k: round(v / fb, 2) for k, v in c.items()}}))


if __name__ == "__main__":
    main()
