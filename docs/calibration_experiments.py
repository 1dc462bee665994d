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
   tangent evidence (``optimize_prior_precision(method="tangent")``), its mode sought over all
   of t and over rescalings of θ*'s weight tensors (the default).
5. ``users``: networks as a user trains them (plain torch, Adam, weight decay 0 / 1e-4 / 1e-3,
   MLP 64-64-64-10), four digits splits: the MAP against ``Laplace(model, "classification")``
   with ``optimize_prior_precision()`` at its default (the tangent evidence, scales) and with
   ``method="marglik"`` (the evidence at θ*), and the full tangent search.
6. ``regression``: UCI yacht, Boston housing, concrete (three splits each), MLP 50-50 ReLU,
   Adam with weight decay 1e-4: Gaussian test NLL of the MAP (σ from the training residuals)
   and of all-weights KFAC with δ and σ by the evidence at θ* and by the tangent evidence.

Prints Markdown tables; arguments choose parts (``table why tangent tables users
regression``, default all).
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
            la.optimize_prior_precision(method="marglik", prior_structure=prior, n_steps=200,
                                         lr=0.1)
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
        la.optimize_prior_precision(method="marglik", prior_structure="scalar", n_steps=200,
                                     lr=0.1)
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
    linearised model's evidence at its own mode, ``method="tangent"``; Antorán et al., 2022),
    its mode sought over all of t (``tangent_search="full"``) and over rescalings of θ*'s weight
    tensors, t = Σ_k c_k θ*_k (``"scales"``, the default)."""
    import time

    print("\n| split | MAP | evidence at θ*: δ, NLL (ECE) | tangent, full: δ, NLL (ECE), time "
          "| tangent, scales: δ, NLL (ECE), time |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        model, train, (Xte, yte) = digits_model(seed)
        with torch.no_grad():
            p = torch.softmax(model(Xte), -1)
        cells = [f"{metrics.nll(p, yte).item():.3f} ({metrics.ece(p, yte).item():.3f})"]
        for method, search in (("marglik", None), ("tangent", "full"), ("tangent", "scales")):
            la = marglik.Laplace(model, "classification", hessian_structure="kron")
            la.fit([train])
            t0 = time.perf_counter()
            kw = {} if search is None else {"tangent_search": search}
            la.optimize_prior_precision(method=method, prior_structure="scalar", **kw)
            seconds = time.perf_counter() - t0
            probs = la(Xte)
            cells.append(f"{la.prior_precision.item():.3g}, {metrics.nll(probs, yte).item():.3f} "
                         f"({metrics.ece(probs, yte).item():.3f})"
                         + ("" if search is None else f", {seconds:.1f} s"))
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: test NLL (ECE); probit link")


def user_model(seed: int, weight_decay: float) -> tuple[nn.Module, tuple, tuple]:
    """MLP 64-64-64-10 (ReLU) as a user trains it: torch.optim.Adam (lr 1e-3, coupled weight
    decay), batch 64, 100 epochs, none of marglik's helpers."""
    Xtr, ytr, Xte, yte = load_digits_split(flatten=True, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        for i in torch.randperm(len(Xtr), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr[i]), ytr[i]).backward()
            opt.step()
    return model, (Xtr, ytr), (Xte, yte)


def users(seeds: list[int]) -> None:
    """Defaults on users' networks: ``Laplace(model, "classification")`` (all weights, KFAC),
    ``fit``, ``optimize_prior_precision()``, ``la(x)`` against the MAP."""
    rows = {"MAP": "MAP", "default": "default (tangent, scales)",
            "marglik": "method='marglik' (at θ*)", "full": "tangent, full search"}
    print("\n| weight decay | posterior | " + " | ".join(f"split {s}" for s in seeds)
          + " | mean NLL (ECE) |")
    print("|---|---|" + "---|" * len(seeds) + "---|")
    for wd in (0.0, 1e-4, 1e-3):
        cells: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
        for seed in seeds:
            model, train, (Xte, yte) = user_model(seed, wd)
            with torch.no_grad():
                probs = {"MAP": torch.softmax(model(Xte), -1)}
            for key, kw in (("default", {}), ("marglik", {"method": "marglik"}),
                            ("full", {"method": "tangent", "tangent_search": "full"})):
                la = marglik.Laplace(model, "classification")
                la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train),
                                                   batch_size=256))
                la.optimize_prior_precision(**kw)
                probs[key] = la(Xte)
            for key, p in probs.items():
                cells[key].append((metrics.nll(p, yte).item(), metrics.ece(p, yte).item()))
        for key, name in rows.items():
            nll = statistics.mean(a for a, _ in cells[key])
            ece = statistics.mean(b for _, b in cells[key])
            print(f"| {wd:g} | {name} | " + " | ".join(f"{a:.3f} ({b:.3f})" for a, b in cells[key])
                  + f" | **{nll:.4f}** ({ece:.4f}) |", flush=True)
    print("\ncells: test NLL (ECE); probit link")


def regression() -> None:
    """UCI regression: Gaussian test NLL (standardised targets) of the MAP and of all-weights
    KFAC with δ and σ by the evidence at θ* and by the (default) tangent evidence."""
    import math

    from marglik.data import load_uci

    def nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
        return (0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean().item()

    print("\n| data | MAP (σ from residuals) | evidence at θ*: NLL, σ "
          "| tangent (default): NLL, σ |")
    print("|---|---|---|---|")
    for name in ("yacht", "bostonHousing", "concrete"):
        for split in range(3):
            d = load_uci(name, split)
            torch.manual_seed(split)
            model = nn.Sequential(nn.Linear(d.X_train.shape[1], 50), nn.ReLU(),
                                  nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 1))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
            g = torch.Generator().manual_seed(split)
            for _ in range(300):
                for i in torch.randperm(len(d.X_train), generator=g).split(64):
                    opt.zero_grad()
                    nn.functional.mse_loss(model(d.X_train[i]), d.y_train[i]).backward()
                    opt.step()
            with torch.no_grad():
                mean = model(d.X_test)
                s2 = (model(d.X_train) - d.y_train).square().mean()
            cells = [f"{nll(mean, s2, d.y_test):.3f}"]
            for kw in ({"method": "marglik"}, {}):
                la = marglik.Laplace(model, "regression")
                la.fit([(d.X_train, d.y_train)])
                la.optimize_prior_precision(tune_sigma=True, **kw)
                f_mean, f_var = la(d.X_test)
                var = f_var[..., 0] + la.sigma_noise**2
                cells.append(f"{nll(f_mean, var, d.y_test):.3f}, {la.sigma_noise.item():.3f}")
            print(f"| {name} {split} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: Gaussian test NLL per point, standardised targets")


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
            ll.optimize_prior_precision(method="marglik", prior_structure="layerwise")
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
             "tangent": lambda: digits_tangent([0, 1, 2, 3]), "tables": tables,
             "users": lambda: users([0, 1, 2, 3]), "regression": regression}
    for part in sys.argv[1:] or list(parts):  # e.g. python docs/calibration_experiments.py tangent
        parts[part]()
