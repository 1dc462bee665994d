"""LaplaceRegressor / LaplaceClassifier against scikit-learn baselines, a few splits each.

Regression on UCI sets (standard splits, ``../shared/data/uci``; ``marglik.data.load_uci``):
LaplaceRegressor (defaults: MLP 50 tanh, 1000 full-batch epochs, evidence every 50), MLPRegressor
(50 tanh, lbfgs) tuned by GridSearchCV over alpha (3-fold), Ridge tuned by RidgeCV, and
HistGradientBoostingRegressor (defaults). Test RMSE and mean Gaussian log-likelihood in the
target's units; baselines without a predictive variance get σ² = their mean squared training
residual. Classification on scikit-learn's breast cancer (random stratified 70/30 splits):
LaplaceClassifier against LogisticRegressionCV (standardised inputs): accuracy, NLL, ECE.
Wall time per fit (grid search included). One JSON line per (set, split, method).

    nice python benchmarks/tabular_sklearn.py [--sets yacht energy concrete] [--splits 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from marglik import LaplaceClassifier, LaplaceRegressor, metrics
from marglik.data import load_uci


def gaussian_ll(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """Mean log N(y | mean, std²)."""
    return float(np.mean(-0.5 * np.log(2 * np.pi * std**2) - 0.5 * ((y - mean) / std) ** 2))


def regressors(seed: int) -> dict:
    return {
        "LaplaceRegressor": LaplaceRegressor(random_state=seed),
        "MLPRegressor+GridSearchCV(alpha)": GridSearchCV(
            MLPRegressor(hidden_layer_sizes=(50,), activation="tanh", solver="lbfgs", max_iter=1000,
                         random_state=seed),
            {"alpha": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]}, cv=3),
        "RidgeCV": RidgeCV(alphas=np.logspace(-4, 3, 15)),
        "HistGradientBoosting": HistGradientBoostingRegressor(random_state=seed),
    }


def run_regression(name: str, split: int) -> None:
    d = load_uci(name, split, dtype=torch.float64)
    Xtr, ytr = d.X_train.numpy(), d.y_train.numpy().ravel()
    Xte, yte = d.X_test.numpy(), d.y_test.numpy().ravel()
    scale = float(d.y_std)
    for method, est in regressors(split).items():
        tic = time.perf_counter()
        est.fit(Xtr, ytr)
        seconds = time.perf_counter() - tic
        if isinstance(est, LaplaceRegressor):
            mean, std = est.predict(Xte, return_std=True)
        else:
            mean = est.predict(Xte)
            std = np.full_like(mean, np.sqrt(np.mean((est.predict(Xtr) - ytr) ** 2)))
        print(json.dumps({
            "set": name, "split": split, "method": method, "n_train": len(ytr),
            "rmse": float(np.sqrt(np.mean((mean - yte) ** 2))) * scale,
            "test_ll": gaussian_ll(yte, mean, std) - math.log(scale),
            "seconds": round(seconds, 2),
        }), flush=True)


def run_breast_cancer(split: int) -> None:
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=split)
    models = {
        "LaplaceClassifier": LaplaceClassifier(random_state=split),
        "LogisticRegressionCV": make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=10, max_iter=5000)),
    }
    for method, est in models.items():
        tic = time.perf_counter()
        est.fit(Xtr, ytr)
        seconds = time.perf_counter() - tic
        probs = torch.as_tensor(est.predict_proba(Xte))
        target = torch.as_tensor(yte)
        print(json.dumps({
            "set": "breast_cancer", "split": split, "method": method, "n_train": len(ytr),
            "accuracy": metrics.accuracy(probs, target).item(),
            "nll": metrics.nll(probs, target).item(),
            "ece": metrics.ece(probs, target).item(),
            "seconds": round(seconds, 2),
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["yacht", "energy", "concrete"])
    parser.add_argument("--splits", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for split in range(args.splits):
        run_breast_cancer(split)
    for name in args.sets:
        for split in range(args.splits):
            run_regression(name, split)


if __name__ == "__main__":
    main()
