"""The measurements behind docs/calibration.md (run: ``python docs/calibration_experiments.py``).

1. digits, four random splits: MAP against post-hoc Laplace posteriors (all weights / last layer,
   KFAC / full GGN, probit / Monte Carlo link), layer-wise prior precision tuned by the evidence
   (all-weights full GGN: a scalar prior, layer-wise is slow for a dense 3,466² matrix).
2. digits, split 0: why — the share of the logit variance along the all-ones direction (which
   the softmax ignores), MacKay's effective number of parameters γ, and the test NLL as the scalar
   prior precision grows beyond its evidence optimum.
3. three small scikit-learn tables (iris, wine, breast cancer; 3 splits each, 1/3 test): the
   ``marglik fit`` recipe (online evidence training, then the all-weights KFAC posterior) against
   the evidence-trained MAP and last-layer posteriors at the same weights.
4. digits, four splits: all-weights KFAC with a scalar δ from the usual evidence against the
   tangent evidence (``optimize_prior_precision(method="tangent")``).

Prints Markdown tables; arguments choose parts (``table why tangent tables``, default all).
About 5 minutes on one CPU thread without part 4.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

import marglik
from marglik import metrics
from marglik.data import Standardizer, load_digits_split
from marglik.predictive import glm_moments
from marglik.training import marglik_training, train_map

torch.set_num_threads(1)
MC = 1000


def digits_model(seed: int) -> tuple[nn.Module, tuple, tuple]:
    """The `marglik demo` network: MLP 64-32-32-10 ReLU, Adam 150 epochs, batch 128, δ = 1."""
    Xtr, ytr, Xte, yte = load_digits_split(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    data = torch.utils.data.TensorDataset(Xtr, ytr)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, generator=g)
    train_map(model, loader, "classification", n_epochs=150, lr=3e-3, prior_precision=1.0)
    return model, (Xtr, ytr), (Xte, yte)


def mc_probs(la: marglik.Laplace, X: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    return la(X, pred_type="glm", link_approx="mc", n_samples=MC)


CONFIGS = [
    ("all", "kron", "layerwise"),
    ("all", "full", "scalar"),
    ("last_layer", "kron", "layerwise"),
    ("last_layer", "full", "layerwise"),
]


def digits_table(seeds: list[int]) -> None:
    names = ["MAP"] + [f"{s} {h} {link}" for s, h, _ in CONFIGS for link in ("probit", "mc")]
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for seed in seeds:
        model, train, (Xte, yte) = digits_model(seed)
        with torch.no_grad():
            p = torch.softmax(model(Xte), -1)
        results["MAP"].append((metrics.nll(p, yte).item(), metrics.ece(p, yte).item()))
        for subset, structure, prior in CONFIGS:
            la = marglik.Laplace(
                model, "classification", subset_of_weights=subset, hessian_structure=structure
            )
            la.fit([train])
            la.optimize_prior_precision(prior_structure=prior, n_steps=200, lr=0.1)
            for link, probs in (("probit", la(Xte)), ("mc", mc_probs(la, Xte))):
                nll, ece = metrics.nll(probs, yte).item(), metrics.ece(probs, yte).item()
                results[f"{subset} {structure} {link}"].append((nll, ece))
        print(f"split {seed} done", flush=True)
    print("\n| posterior | link | " + " | ".join(f"split {s}" for s in seeds) + " | mean |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    for name, values in results.items():
        label, link = (name, "-") if name == "MAP" else (name.rsplit(" ", 1)[0], name.split()[-1])
        cells = [f"{n:.3f} ({e:.3f})" for n, e in values]
        mean = statistics.mean(n for n, _ in values)
        print(f"| {label} | {link} | " + " | ".join(cells) + f" | {mean:.3f} |")
    print("\ncells: test NLL (ECE)")


def digits_why(seed: int = 0) -> None:
    model, train, (Xte, yte) = digits_model(seed)
    print("\n| posterior | P | γ (effective parameters) | share of logit variance along 1 |")
    print("|---|---|---|---|")
    for subset, structure, _ in CONFIGS:
        la = marglik.Laplace(
            model, "classification", subset_of_weights=subset, hessian_structure=structure
        )
        la.fit([train])
        la.optimize_prior_precision(prior_structure="scalar", n_steps=200, lr=0.1)
        delta = la.prior_precision
        gamma = la.n_params - (delta * la.posterior_variance).sum().item()  # P − δ tr Σ
        _, V = glm_moments(la, Xte)
        C = V.shape[-1]
        ones = torch.ones(C) / math.sqrt(C)
        along = torch.einsum("c,bcd,d->b", ones, V, ones)
        share = (along / V.diagonal(dim1=-2, dim2=-1).sum(-1)).mean().item()
        print(f"| {subset} {structure} | {la.n_params} | {gamma:.0f} | {share:.2f} |")
        if subset == "all" and structure == "kron":
            scan_la, best = la, delta.item()
            norm2 = la.mean.square().sum().item()
    print(f"\nall-weights KFAC, scalar δ* = {best:.3g}, ‖θ*‖² = {norm2:.0f}")
    print("\n| δ / δ* | log Z | test NLL (probit) | ECE |")
    print("|---|---|---|---|")
    for factor in (1, 10, 100, 1000):
        scan_la.prior_precision = torch.tensor(best * factor)
        probs = scan_la(Xte)
        print(
            f"| {factor} | {scan_la.log_marginal_likelihood().item():.1f} | "
            f"{metrics.nll(probs, yte).item():.3f} | {metrics.ece(probs, yte).item():.3f} |"
        )


def digits_tangent(seeds: list[int]) -> None:
    """All-weights KFAC, scalar δ: the usual evidence (at θ*) against the tangent evidence (the
    linearised model's evidence at its own mode, ``method="tangent"``; Antorán et al., 2022)."""
    import time

    print("\n| split | MAP | evidence at θ*: δ, NLL (ECE) | tangent evidence: δ, NLL (ECE) "
          "| rounds | tangent time |")
    print("|---|---|---|---|---|---|")
    for seed in seeds:
        model, train, (Xte, yte) = digits_model(seed)
        with torch.no_grad():
            p = torch.softmax(model(Xte), -1)
        cells = [f"{metrics.nll(p, yte).item():.3f} ({metrics.ece(p, yte).item():.3f})"]
        for method in ("marglik", "tangent"):
            la = marglik.Laplace(model, "classification", hessian_structure="kron")
            la.fit([train])
            t0 = time.perf_counter()
            hist = la.optimize_prior_precision(method=method, prior_structure="scalar",
                                               train_loader=[train])
            seconds = time.perf_counter() - t0
            probs = la(Xte)
            cells.append(f"{la.prior_precision.item():.3g}, {metrics.nll(probs, yte).item():.3f} "
                         f"({metrics.ece(probs, yte).item():.3f})")
        cells += [str(len(hist["log_marglik"])), f"{seconds:.1f} s"]
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: test NLL (ECE); probit link")


def tables() -> None:
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine

    rows: dict[str, list[float]] = {}
    print("\n| data | split | acc | MAP | all KFAC probit | all KFAC mc | last-layer KFAC probit |")
    print("|---|---|---|---|---|---|---|")
    for name, load in (("iris", load_iris), ("wine", load_wine), ("cancer", load_breast_cancer)):
        d = load()
        X, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
        for seed in range(3):
            perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
            test, train = perm[: len(X) // 3], perm[len(X) // 3 :]
            scaler = Standardizer().fit(X[train])
            Xtr, Xte = scaler.transform(X[train]), scaler.transform(X[test])
            torch.manual_seed(seed)
            model = nn.Sequential(
                nn.Linear(X.shape[1], 50), nn.Tanh(), nn.Linear(50, int(y.max()) + 1)
            )
            la, model, _ = marglik_training(
                model,
                [(Xtr, y[train])],
                "classification",
                n_epochs=1000,
                lr=1e-2,
                n_epochs_burnin=49,
                marglik_frequency=50,
                n_hypersteps=50,
            )
            with torch.no_grad():
                p_map = torch.softmax(model(Xte), -1)
            ll = marglik.Laplace(
                model,
                "classification",
                subset_of_weights="last_layer",
                prior_precision=la.prior_precision[-2:],
            )
            ll.fit([(Xtr, y[train])])
            ll.optimize_prior_precision(prior_structure="layerwise")
            cells = {
                "MAP": p_map,
                "all probit": la(Xte),
                "all mc": mc_probs(la, Xte),
                "ll probit": ll(Xte),
            }
            values = {k: metrics.nll(p, y[test]).item() for k, p in cells.items()}
            for k, v in values.items():
                rows.setdefault(k, []).append(v)
            acc = metrics.accuracy(p_map, y[test]).item()
            print(
                f"| {name} | {seed} | {acc:.3f} | "
                + " | ".join(f"{v:.3f}" for v in values.values())
                + " |"
            )
    means = " | ".join(f"{statistics.mean(v):.3f}" for v in rows.values())
    print(f"| mean | | | {means} |\n\ncells: test NLL")


if __name__ == "__main__":
    import sys

    parts = {"table": lambda: digits_table([0, 1, 2, 3]), "why": digits_why,
             "tangent": lambda: digits_tangent([0, 1, 2, 3]), "tables": tables}
    for part in sys.argv[1:] or list(parts):  # e.g. python docs/calibration_experiments.py tangent
        parts[part]()
