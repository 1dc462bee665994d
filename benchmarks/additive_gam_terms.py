"""Are a UCI set's features informative to pyGAM? Per-term p-values and partial-dependence spread.

For each split of ``--set``: pyGAM's ``LinearGAM().gridsearch`` (its default λ grid) on all
features, then on all but ``--drop``; prints one JSON line per split with each term's p-value,
the standard deviation over the training inputs of its partial dependence (standardised target
units: how much the term moves the prediction), the chosen λ, the effective degrees of freedom,
and for both fits the training RMSE, GCV and AIC (training criteria) and the test
log-likelihood per point (original units, the 95 % prediction interval as ±1.96 std, as
``benchmarks/additive.py``). Used to check whether features LA-NAM's evidence switched off are
informative (``RESULTS-additive.md``). pyGAM is installed beside the environment (see
``benchmarks/additive.py``):

    PYTHONPATH=src:/tmp/lanam-pygam python benchmarks/additive_gam_terms.py --set concrete \\
        --splits 0 --drop 2 5 6
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from provenance import commit  # benchmarks/provenance.py
from pygam import LinearGAM

from marglik.data import load_uci


def test_ll(gam: LinearGAM, X: np.ndarray, y: np.ndarray, y_std: float) -> float:
    mean = gam.predict(X)
    lo, hi = gam.prediction_intervals(X, width=0.95).T
    var = ((hi - lo) / (2 * 1.959964)) ** 2
    return float(np.mean(-0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var))) - math.log(
        y_std)


def summary(gam: LinearGAM, X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray,
            y_std: float) -> dict:
    return dict(train_rmse=float(np.sqrt(np.mean((gam.predict(X) - y) ** 2))),
                GCV=float(gam.statistics_["GCV"]), AIC=float(gam.statistics_["AIC"]),
                test_ll=test_ll(gam, Xt, yt, y_std))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", default="concrete")
    p.add_argument("--splits", type=int, nargs="+", default=[0])
    p.add_argument("--drop", type=int, nargs="+", default=[])
    args = p.parse_args()
    for split in args.splits:
        s = load_uci(args.set, split)
        X, y = s.X_train.double().numpy(), s.y_train[:, 0].double().numpy()
        Xt, yt = s.X_test.double().numpy(), s.y_test[:, 0].double().numpy()
        d = X.shape[1]
        gam = LinearGAM().gridsearch(X, y, progress=False)
        row = dict(set=args.set, split=split,
                   p_values=[float(f"{v:.3g}") for v in gam.statistics_["p_values"][:d]],
                   pd_std=[round(float(np.std(gam.partial_dependence(term=i, X=X))), 3)
                           for i in range(d)],
                   lam=[float(f"{v[0]:.3g}") for v in gam.lam[:d]],
                   edof=round(float(gam.statistics_["edof"]), 1),
                   all=summary(gam, X, y, Xt, yt, float(s.y_std)))
        if args.drop:
            keep = [i for i in range(d) if i not in args.drop]
            gam2 = LinearGAM().gridsearch(X[:, keep], y, progress=False)
            row[f"without_{'_'.join(map(str, args.drop))}"] = summary(
                gam2, X[:, keep], y, Xt[:, keep], yt, float(s.y_std))
        row.update(load1=round(os.getloadavg()[0], 2), commit=commit())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
