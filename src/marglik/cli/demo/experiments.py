"""The demo's experiments: digits (classification) and diabetes (regression), and their settings.

:func:`run_digits` and :func:`run_diabetes` train, fit the Laplace posteriors, tune them by the
evidence and evaluate them; each returns a dictionary of results (keys starting with ``_`` hold
tensors and posteriors for the plots and are left out of ``summary.json``). The configurations
are described in :mod:`marglik.cli.demo`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

import marglik
from marglik import metrics
from marglik.data import load_digits_split, load_regression_set
from marglik.nets import mlp
from marglik.training import marglik_training, train_map

#: Monte Carlo samples of the logits for link_approx="mc"
MC_SAMPLES = 1000
HEADLINE_CLASSIFICATION = "Laplace last-layer full GGN (probit)"
HEADLINE_REGRESSION = "evidence-trained + Laplace all KFAC"


def settings(quick: bool) -> dict[str, Any]:
    """Epochs, steps and samples of the full run, or of ``--quick`` (a smoke test)."""
    if quick:
        return {
            "digits_epochs": 3,
            "diabetes_epochs": 50,
            "online_epochs": 40,
            "evidence_every": 20,
            "hyper_steps": 10,
            "mc_samples": 100,
            "full_all_weights": False,
            "scan": False,
        }
    return {
        "digits_epochs": 150,
        "diabetes_epochs": 1000,
        "online_epochs": 1000,
        "evidence_every": 50,
        "hyper_steps": 200,
        "mc_samples": MC_SAMPLES,
        "full_all_weights": True,
        "scan": True,
    }


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def _progress() -> bool:
    return sys.stderr.isatty()


def _probs(la: Any, X: Tensor, link: str, n_samples: int, seed: int) -> Tensor:
    torch.manual_seed(seed)  # the Monte Carlo link draws logits
    if link == "mc":
        return la(X, pred_type="glm", link_approx="mc", n_samples=n_samples)
    return la(X, pred_type="glm", link_approx=link)


def _regression_moments(la: Any, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean (N, 1), function variance (N, 1), predictive variance with noise (N, 1))."""
    f_mean, f_var = la(X, pred_type="glm")
    f_var = f_var.reshape(len(X), -1)[:, :1]
    return f_mean.reshape(-1, 1), f_var, f_var + la.sigma_noise.reshape(()) ** 2


def _hyper(la: Any) -> dict[str, Any]:
    out = {"prior_precision": [round(v, 6) for v in la.prior_precision.reshape(-1).tolist()]}
    if la.sigma_noise is not None:
        out["sigma_noise"] = la.sigma_noise.reshape(()).item()
    return out


# ---- classification ---------------------------------------------------------------------------
def run_digits(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    Xtr, ytr, Xte, yte = load_digits_split(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = mlp([64, 32, 32, 10], nn.ReLU)
    data = torch.utils.data.TensorDataset(Xtr, ytr)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, generator=g)
    prior = 1.0
    with Stopwatch() as sw:
        train_map(
            model,
            loader,
            "classification",
            n_epochs=cfg["digits_epochs"],
            lr=3e-3,
            prior_precision=prior,
            progress=_progress(),
        )
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        map_probs = torch.softmax(model(Xte), -1)

    def row(
        method: str,
        link: str,
        P: int,
        probs: Tensor,
        log_z: float | None,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "method": method,
            "link": link,
            "n_params": P,
            "accuracy": metrics.accuracy(probs, yte).item(),
            "nll": metrics.nll(probs, yte).item(),
            "ece": metrics.ece(probs, yte).item(),
            "log_marglik": log_z,
            "seconds": round(seconds, 2),
            **extra,
        }

    rows = [row(f"MAP (prior precision {prior:g})", "-", n_params, map_probs, None, sw.seconds)]
    probs_of = {"MAP": map_probs}
    traces: dict[str, list[float]] = {}
    train = [(Xtr, ytr)]
    configs = [
        ("Laplace all KFAC", "all", "kron", "layerwise", ["probit", "mc"]),
        ("Laplace all full GGN", "all", "full", "scalar", ["probit", "mc"]),
        ("Laplace last-layer KFAC", "last_layer", "kron", "layerwise", ["probit", "mc"]),
        ("Laplace last-layer full GGN", "last_layer", "full", "layerwise", ["probit", "mc"]),
    ]
    if not cfg["full_all_weights"]:
        configs = [c for c in configs if c[:3] != ("Laplace all full GGN", "all", "full")]
    for method, subset, structure, prior_structure, links in configs:
        with Stopwatch() as fit_sw:
            la = marglik.Laplace(
                model,
                "classification",
                subset_of_weights=subset,
                hessian_structure=structure,
                prior_precision=prior,
            )
            la.fit(train)
            hist = la.optimize_prior_precision(
                prior_structure=prior_structure,
                n_steps=cfg["hyper_steps"],
                lr=0.1,
                progress=_progress(),
            )
            log_z = la.log_marginal_likelihood().item()
        traces[method] = hist["log_marglik"]
        for link in links:
            with Stopwatch() as pred_sw:
                probs = _probs(la, Xte, link, cfg["mc_samples"], seed)
            probs_of[f"{method} ({link})"] = probs
            rows.append(
                row(
                    method,
                    link,
                    la.n_params,
                    probs,
                    log_z,
                    fit_sw.seconds + pred_sw.seconds,
                    prior_structure=prior_structure,
                    **_hyper(la),
                )
            )
        if subset == "all" and structure == "kron" and cfg["scan"]:
            scan = _delta_scan(la, Xte, yte, cfg, seed)
    out = {
        "data": "digits",
        "n_train": len(Xtr),
        "n_test": len(Xte),
        "model": "MLP 64-32-32-10 ReLU",
        "train_epochs": cfg["digits_epochs"],
        "rows": rows,
        "headline": HEADLINE_CLASSIFICATION,
        "evidence_traces": traces,
    }
    if cfg["scan"]:
        out["prior_scan_all_kfac"] = scan
    out["_probs"] = probs_of
    out["_test"] = yte
    return out


def _delta_scan(la: Any, Xte: Tensor, yte: Tensor, cfg: dict, seed: int) -> list[dict[str, float]]:
    """Test NLL of the all-weights posterior as the scalar δ grows beyond the evidence optimum."""
    saved = la.prior_precision
    la.optimize_prior_precision(prior_structure="scalar", n_steps=cfg["hyper_steps"], lr=0.1)
    best = la.prior_precision.item()
    scan = []
    for factor in (1, 10, 100, 1000):
        la.prior_precision = torch.tensor(best * factor)
        probs = _probs(la, Xte, "probit", cfg["mc_samples"], seed)
        scan.append(
            {
                "prior_precision": best * factor,
                "factor": factor,
                "log_marglik": la.log_marginal_likelihood().item(),
                "nll": metrics.nll(probs, yte).item(),
                "ece": metrics.ece(probs, yte).item(),
            }
        )
    la.prior_precision = saved
    return scan


# ---- regression -------------------------------------------------------------------------------
def run_diabetes(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    split = load_regression_set("diabetes", seed=seed)
    Xtr, ytr, Xte, yte = split.X_train, split.y_train, split.X_test, split.y_test
    scale = split.y_std.item()
    train = [(Xtr, ytr)]

    def row(
        method: str,
        P: int,
        mean: Tensor,
        var: Tensor,
        log_z: float | None,
        seconds: float,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "method": method,
            "n_params": P,
            "rmse": metrics.rmse(mean, yte).item() * scale,
            "nll": metrics.gaussian_nll(mean, var, yte).item() + math.log(scale),
            "calibration_error": metrics.regression_calibration_error(mean, var, yte).item(),
            "log_marglik": log_z,
            "seconds": round(seconds, 2),
            **extra,
        }

    rows, traces, predictions = [], {}, {}

    def laplace_rows(
        model: nn.Module, tag: str, prior: float, sigma: float, skip: tuple[str, ...] = ()
    ) -> None:
        configs = [
            ("Laplace all KFAC", "all", "kron", "layerwise"),
            ("Laplace all full GGN", "all", "full", "scalar"),
            ("Laplace last-layer KFAC", "last_layer", "kron", "layerwise"),
        ]
        for method, subset, structure, prior_structure in configs:
            if method in skip:
                continue
            with Stopwatch() as sw:
                la = marglik.Laplace(
                    model,
                    "regression",
                    subset_of_weights=subset,
                    hessian_structure=structure,
                    prior_precision=prior,
                    sigma_noise=sigma,
                )
                la.fit(train)
                hist = la.optimize_prior_precision(
                    prior_structure=prior_structure,
                    tune_sigma=True,
                    n_steps=cfg["hyper_steps"],
                    lr=0.1,
                    progress=_progress(),
                )
                mean, f_var, var = _regression_moments(la, Xte)
            name = f"{tag}{method}"
            traces[name] = hist["log_marglik"]
            predictions[name] = (la, mean, f_var, var)
            rows.append(
                row(
                    name,
                    la.n_params,
                    mean,
                    var,
                    la.log_marginal_likelihood().item(),
                    sw.seconds,
                    prior_structure=prior_structure,
                    **_hyper(la),
                )
            )

    # 1. MAP with a default prior, then post-hoc Laplace
    torch.manual_seed(seed)
    model = mlp([Xtr.shape[1], 50, 1], nn.Tanh)
    prior = 1.0
    with Stopwatch() as sw:
        train_map(
            model,
            train,
            "regression",
            n_epochs=cfg["diabetes_epochs"],
            lr=1e-2,
            prior_precision=prior,
            sigma_noise=1.0,
            progress=_progress(),
        )
    with torch.no_grad():
        mean = model(Xte)
        sigma2 = (model(Xtr) - ytr).square().mean()  # noise: training residuals
    n_params = sum(p.numel() for p in model.parameters())
    rows.append(
        row(
            f"MAP (prior precision {prior:g}, sigma from residuals)",
            n_params,
            mean,
            sigma2.expand_as(mean),
            None,
            sw.seconds,
        )
    )
    laplace_rows(model, "", prior, 1.0)

    # 2. evidence-trained: online evidence maximisation (Immer et al. 2021, Algorithm 1)
    torch.manual_seed(seed)
    model = mlp([Xtr.shape[1], 50, 1], nn.Tanh)
    every = cfg["evidence_every"]
    with Stopwatch() as sw:
        la, model, hist = marglik_training(
            model,
            train,
            "regression",
            hessian_structure="kron",
            prior_structure="layerwise",
            n_epochs=cfg["online_epochs"],
            lr=1e-2,
            n_epochs_burnin=every - 1,
            marglik_frequency=every,
            n_hypersteps=50,
            progress=_progress(),
        )
    with torch.no_grad():
        mean = model(Xte)
        sigma2 = (model(Xtr) - ytr).square().mean()
    rows.append(
        row(
            "evidence-trained MAP (sigma from residuals)",
            n_params,
            mean,
            sigma2.expand_as(mean),
            None,
            sw.seconds,
            epochs=cfg["online_epochs"],
        )
    )
    with Stopwatch() as pred_sw:
        mean, f_var, var = _regression_moments(la, Xte)
    name = HEADLINE_REGRESSION
    predictions[name] = (la, mean, f_var, var)
    rows.append(
        row(
            name,
            la.n_params,
            mean,
            var,
            la.log_marginal_likelihood().item(),
            sw.seconds + pred_sw.seconds,
            prior_structure="layerwise (tuned online)",
            **_hyper(la),
        )
    )
    evaluated = [(e + 1, v) for e, v in enumerate(hist["log_marglik"]) if not math.isnan(v)]
    tuned_prior = la.prior_precision.reshape(-1)
    laplace_rows(
        model,
        "evidence-trained + ",
        tuned_prior.log().mean().exp().item(),
        la.sigma_noise.reshape(()).item(),
        skip=("Laplace all KFAC",),
    )
    return {
        "data": "diabetes",
        "n_train": len(Xtr),
        "n_test": len(Xte),
        "model": "MLP 10-50-1 tanh",
        "train_epochs": cfg["diabetes_epochs"],
        "online_training": {
            "epochs": cfg["online_epochs"],
            "evidence_every": every,
            "evidence_epochs": [e for e, _ in evaluated],
            "log_marglik": [v for _, v in evaluated],
            "sigma_noise": [hist["sigma_noise"][e - 1] for e, _ in evaluated],
            "best_epoch": max(evaluated, key=lambda ev: ev[1])[0],
        },
        "rows": rows,
        "headline": HEADLINE_REGRESSION,
        "evidence_traces": traces,
        "_predictions": predictions,
        "_split": split,
    }
