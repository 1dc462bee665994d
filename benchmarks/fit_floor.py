"""How close can a KFAC fit get to one epoch? The unavoidable operations alone, timed (JSON lines).

    python benchmarks/fit_floor.py [--repeats 7] [--with-fit]

For the models and batches of ``benchmarks/fit.py`` (MLP 85k and CNN on sklearn digits, batch
128, float32, one thread) this times, with plain torch and no marglik code, only what a KFAC fit
of K output columns cannot skip, per batch:

- the forward pass with autograd recording (the layers' outputs z_l kept),
- K backward passes of the columns U_k to every z_l (input gradients only: ``autograd.grad``, one
  per column — on a CPU as fast as one vmapped pass, see ``marglik.curvature.backprop``),
- the Kronecker factors from the recorded a_l and b_l: expand A = Σ a aᵀ (convolutions by the
  cheaper of unfolded patches and channel covariances, ``marglik.curvature.conv.patch_gram``),
  G = Σ_{k,n,r} b bᵀ; reduce A = Σ_n ā āᵀ, G = Σ_{k,n} b̃ b̃ᵀ (products only, nothing kept),
  either with the K columns' gradients stacked into one tensor (one larger product, one copy)
  or one product per column (no copy); the cheaper of the two (CPU time) is the floor.

K = C − 1 = 9 is the exact GGN (the softmax Hessian's rank), K = 1 one sampled column. The columns'
values do not change the cost, so they are random. The ratio ``floor / epoch`` is a lower bound on
``fit / epoch`` for any implementation that computes these products in float32 with torch's
kernels: the issue-19 targets (≤ 2 exact, ≤ 1.3 one column) are within reach only where this
bound is below them. ``--with-fit`` also times marglik's own fit in the same process (so
``fit / floor`` is marglik's remaining overhead). Each line gives wall-clock and CPU-time medians.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.curvature.conv import conv_patch_sums, patch_gram
from marglik.curvature.kfac import gram

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.fit_floor
    from fit import cnn, epoch, median_times, mlp
except ImportError:  # pragma: no cover
    from benchmarks.fit import cnn, epoch, median_times, mlp
from marglik.data import load_digits_split

CASES = (  # (model, kfac_approx, K)
    ("mlp", "expand", 9), ("mlp", "expand", 1),
    ("cnn", "expand", 9), ("cnn", "reduce", 9), ("cnn", "expand", 1), ("cnn", "reduce", 1),
)


def conv_geometry(m: nn.Conv2d) -> tuple:
    return m.kernel_size, m.stride, m.dilation, (m.padding[0], m.padding[0], m.padding[1],
                                                  m.padding[1])


def floor_batch(model: nn.Sequential, x: Tensor, K: int, approx: str, stacked: bool) -> None:
    """One batch of the unavoidable work (see the module docstring); ``stacked``: the K columns'
    gradients copied into one tensor and each factor formed by one product, else one product
    per column (no copies)."""
    inputs, outputs, h = [], [], x
    for m in model:  # forward, keeping each layer's input and output
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            inputs.append((m, h.detach()))
            h = m(h)
            outputs.append(h)
        else:
            h = m(h)
    U = torch.randn(K, *h.shape)
    grads = [torch.autograd.grad(h, outputs, U[k], retain_graph=True) for k in range(K)]
    for i, (m, a) in enumerate(inputs):
        bs = [g[i] for g in grads]  # (N, D_out[, H, W]) per column
        if stacked and K > 1:
            bs = [torch.cat(bs)]  # (K·N, ...)
        if isinstance(m, nn.Linear):
            gram(a)
            sum(gram(b) for b in bs)
            continue
        if approx == "expand":
            patch_gram(a, *conv_geometry(m))
            sum(torch.bmm(b, b.transpose(1, 2)).sum(0) for b in (b.flatten(2) for b in bs))
        else:
            gram(conv_patch_sums(a, *conv_geometry(m)))
            sum(gram(b.flatten(2).sum(-1)) for b in bs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--with-fit", action="store_true", help="also time marglik's fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = load_digits_split()
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    models = {"mlp": mlp(), "cnn": cnn()}
    for name, approx, K in CASES:
        model = models[name]
        t_epoch = median_times(lambda model=model: epoch(model, loader), args.repeats)

        floors = {}
        for stacked in (True, False):
            def floor(model=model, K=K, approx=approx, stacked=stacked):
                for xb, _ in loader:
                    floor_batch(model, xb, K, approx, stacked)

            floors[stacked] = median_times(floor, args.repeats)
        t_floor = min(floors.values(), key=lambda t: t[1])  # the cheaper variant (CPU time)
        row = {"model": name, "kfac_approx": approx, "columns": K,
               "floor_s": round(t_floor[0], 4), "epoch_s": round(t_epoch[0], 4),
               "floor_over_epoch": round(t_floor[0] / t_epoch[0], 2),
               "floor_cpu_ratio": round(t_floor[1] / t_epoch[1], 2),
               "floor_stacked_cpu_s": round(floors[True][1], 4),
               "floor_per_column_cpu_s": round(floors[False][1], 4)}
        if args.with_fit:
            curvature = "ggn" if K > 1 else "ggn-sampled"

            def fit(model=model, approx=approx, curvature=curvature):
                marglik.Laplace(model, "classification", hessian_structure="kron",
                                kfac_approx=approx, curvature=curvature).fit(loader)

            t_fit = median_times(fit, args.repeats)
            row.update(fit_s=round(t_fit[0], 4), fit_over_epoch=round(t_fit[0] / t_epoch[0], 2),
                       fit_cpu_ratio=round(t_fit[1] / t_epoch[1], 2),
                       fit_over_floor_cpu=round(t_fit[1] / t_floor[1], 2))
        row["load_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
