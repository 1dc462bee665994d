"""LA-NAM experiments (issue #15): synthetic feature selection, UCI regression, breast cancer.

Prints one JSON line per run (and appends it to ``--out``). Single torch thread, float32
(``--dtype float64`` for uci's network runs), fixed seeds. Three experiments:

``synthetic``  X ~ U[-1, 1]^10, y = Σ_{d<5} f_d(x_d) + 0.3 ε with f = (sin πx, x², x/2, eˣ,
    tanh 3x) and 5 pure-noise features; N ∈ ``--n``, seeds ``--seeds``; LA-NAM (stage 1). Reports
    the learned δ_d, min(noise δ) / max(informative δ), per-feature shape RMSE against the truth
    and the coverage of the 95 % band (1.96 std) on a 200-point grid (both centred on the
    training inputs), test RMSE on 2,000 fresh points, σ, wall time. ``--figure`` writes the
    shape plots of the first seed of each N.
``uci``  standard splits of ``--sets`` (``../shared/data/uci`` via ``marglik.data.load_uci``),
    metrics in original units (test RMSE, test log-likelihood per point), methods:
      lanam      LA-NAM stage 1 (``fit_additive``, diag GGN, a δ per feature, σ learned);
      lanam_int  + stage 2 with k = min(5, D(D−1)/2) pairs (time = both stages);
      nam        the same network trained on the MSE alone (no prior, no evidence), σ² = train MSE;
      mlp        1×50 GELU MLP by online evidence (marglik_training, KFAC, layer-wise δ, σ) on
                 this script's schedule (the stand-in used before ``LaplaceRegressor`` landed);
      laplace_regressor  ``marglik.LaplaceRegressor`` with its defaults (1×50 tanh MLP, its own
                 budget), ``random_state`` = split;
      hgb        scikit-learn HistGradientBoostingRegressor (defaults), σ² from 5-fold CV residuals;
      gam        pyGAM LinearGAM, ``gridsearch`` over its default λ grid, its prediction interval.
    Each network run gets about ``--steps`` Adam steps of batch ``--batch-size`` (lr 1e-2, at least
    ``--min-epochs`` epochs), with 10 evidence updates spaced evenly after a burn-in of one spacing.
    ``--patience P``: lanam trains until the best log evidence has not risen by ``--min-delta``
    nats in P updates (``fit_additive(patience=P)``), at most ``--max-steps`` steps, the updates
    spaced as for ``--steps``.
``classification``  breast cancer (scikit-learn), ``--seeds`` stratified 80/20 splits: LA-NAM
    classifier, LogisticRegression (C = 1), pyGAM LogisticGAM (8 splines per feature, gridsearch
    over λ ∈ logspace(−3, 3, 5): its default grid took 732 s per fit here); accuracy, NLL, ECE.

pyGAM is a benchmark-only dependency; it wants scipy < 1.17, so it is installed beside, not into,
the environment: ``pip install --no-deps --target /tmp/lanam-pygam pygam progressbar2
python-utils`` and ``PYTHONPATH=src:/tmp/lanam-pygam``; without it ``gam`` rows are skipped.

    PYTHONPATH=src nice python benchmarks/additive.py synthetic --n 500 5000 --seeds 0 1 2 \
        --figure benchmarks/figures --out benchmarks/additive-results.jsonl
    PYTHONPATH=src:/tmp/lanam-pygam nice python benchmarks/additive.py uci --splits 0 1 2 \
        --out benchmarks/additive-results.jsonl
    PYTHONPATH=src:/tmp/lanam-pygam nice python benchmarks/additive.py classification \
        --seeds 0 1 2 3 4 --out benchmarks/additive-results.jsonl
    python benchmarks/additive.py table --out benchmarks/additive-results.jsonl   # Markdown
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from provenance import commit  # benchmarks/provenance.py

from marglik.applications.additive import (
    AdditiveNet,
    fit_additive,
    fit_interactions,
    plot_shape_functions,
    shape_functions,
)

TRUTH = [lambda x: np.sin(np.pi * x), lambda x: x**2, lambda x: 0.5 * x, np.exp,
         lambda x: np.tanh(3 * x)]
COMMIT = commit()
UCI_SETS = ["concrete", "energy", "kin8nm", "power-plant", "wine-quality-red", "yacht"]


def emit(row: dict, out: str | None) -> None:
    row["load1"] = round(os.getloadavg()[0], 2)
    row["commit"] = COMMIT
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def schedule(n: int, steps: int, batch_size: int, min_epochs: int, updates: int = 10) -> dict:
    """Epochs for about ``steps`` Adam steps, ``updates`` evidence updates after one spacing of
    burn-in."""
    per_epoch = math.ceil(n / batch_size)
    epochs = max(min_epochs, math.ceil(steps / per_epoch))
    every = max(1, epochs // (updates + 1))
    return dict(n_epochs=epochs, batch_size=batch_size, marglik_frequency=every,
                n_epochs_burnin=every)


# ------------------------------------------------------------------------------ synthetic
def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    X = g.uniform(-1, 1, (n, 10))
    y = sum(f(X[:, d]) for d, f in enumerate(TRUTH)) + 0.3 * g.standard_normal(n)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def run_synthetic(args) -> None:
    for n in args.n:
        for seed in args.seeds:
            X, y = synthetic_data(n, seed)
            X_test, y_test = synthetic_data(2000, 10_000 + seed)
            sched = schedule(n, args.steps, args.batch_size, args.min_epochs, args.updates)
            fit = fit_additive(X, y, hidden=tuple(args.hidden), seed=seed, **sched)
            grid = torch.linspace(-1, 1, 200)[:, None].expand(-1, 10).contiguous()
            sf = shape_functions(fit.la, fit.model, X, grid=grid)
            g, Xn = grid.numpy(), X.numpy()
            truth = np.stack([f(g[:, d]) - f(Xn[:, d]).mean() for d, f in enumerate(TRUTH)]
                             + [np.zeros(len(g))] * 5, axis=1)
            mean, std = sf.mean[..., 0].numpy(), sf.std[..., 0].numpy()
            rmse = np.sqrt(((mean - truth) ** 2).mean(0))
            cover = (np.abs(mean - truth) <= 1.96 * std).mean(0)
            delta = fit.feature_precisions.numpy()
            with torch.no_grad():
                pred = fit.model(X_test)[:, 0]
            emit(dict(exp="synthetic", n=n, seed=seed, **sched, hidden=args.hidden,
                      precisions=delta.round(3).tolist(),
                      ratio_noise_informative=float(delta[5:].min() / delta[:5].max()),
                      shape_rmse=rmse.round(4).tolist(),
                      shape_rmse_informative=float(rmse[:5].mean()),
                      coverage=cover.round(3).tolist(),
                      coverage_informative=float(cover[:5].mean()),
                      coverage_noise=float(cover[5:].mean()),
                      sigma=float(fit.la.sigma_noise), test_rmse=float(
                          (pred - y_test).square().mean().sqrt()), seconds=round(fit.seconds, 1)),
                 args.out)
            if args.figure and seed == args.seeds[0]:
                imp = (1 / delta) / (1 / delta).sum()
                fig = plot_shape_functions(
                    g, mean, std, Xn[:300], [f"x{d}" for d in range(10)],
                    truth=[(lambda t, d=d, g=g, tr=truth: np.interp(t, g[:, d], tr[:, d]))
                           for d in range(10)],
                    importances=imp)
                fig.savefig(os.path.join(args.figure, f"additive_synthetic_n{n}.png"), dpi=70)


# ------------------------------------------------------------------------------------ UCI
def gauss_ll(mean: np.ndarray, var: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(-0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)))


def _la_predict(la, x):
    f_mean, f_var = la(x)
    var = f_var[:, 0, 0] + la.sigma_noise.reshape(-1)[0] ** 2
    return f_mean[:, 0].detach().numpy(), var.detach().numpy()


def _plain_nam(X, y, sched, hidden, seed):
    torch.manual_seed(seed)
    model = AdditiveNet(X.shape[1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(sched["n_epochs"]):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), sched["batch_size"]):
            idx = perm[i:i + sched["batch_size"]]
            opt.zero_grad()
            loss = (model(X[idx]) - y[idx]).square().mean()
            loss.backward()
            opt.step()
    with torch.no_grad():
        s2 = float((model(X) - y).square().mean())
    return model, s2


def _mlp(X, y, sched, seed):
    from torch import nn

    from marglik import marglik_training

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], 50), nn.GELU(), nn.Linear(50, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                         batch_size=sched["batch_size"], shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    la, _, _ = marglik_training(model, loader, "regression", hessian_structure="kron",
                                n_epochs=sched["n_epochs"], lr=1e-2,
                                marglik_frequency=sched["marglik_frequency"],
                                n_epochs_burnin=sched["n_epochs_burnin"], n_hypersteps=50)
    return la


def run_uci(args) -> None:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import cross_val_predict

    from marglik.data import load_uci

    try:
        from pygam import LinearGAM
    except ImportError:
        LinearGAM = None
    for name in args.sets:
        for split in args.splits:
            s = load_uci(name, split)
            dtype = getattr(torch, args.dtype)
            X, y, Xt = s.X_train.to(dtype), s.y_train.to(dtype), s.X_test.to(dtype)
            yt = s.y_test[:, 0].numpy()
            ys, n, d = float(s.y_std), len(X), X.shape[1]
            sched = schedule(n, args.steps, args.batch_size, args.min_epochs, args.updates)
            stop = {}
            if args.patience is not None:  # --steps sets the spacing, --max-steps the maximum
                sched["n_epochs"] = max(sched["n_epochs"], math.ceil(
                    args.max_steps / math.ceil(n / args.batch_size)))
                stop = dict(patience=args.patience, min_delta=args.min_delta)
            base = dict(exp="uci", set=name, split=split, n_train=n, **sched, dtype=args.dtype,
                        hidden=args.hidden, activation=args.activation,
                        lr_schedule=args.lr_schedule, **stop)

            def report(method, mean, var, seconds, base=base, yt=yt, ys=ys, **extra):
                emit(dict(base, method=method, rmse=float(np.sqrt(np.mean((mean - yt) ** 2))) * ys,
                          ll=gauss_ll(mean, var, yt) - math.log(ys), seconds=round(seconds, 1),
                          **extra), args.out)

            if "lanam" in args.methods or "lanam_int" in args.methods:
                fit = fit_additive(X, y, hidden=tuple(args.hidden), activation=args.activation,
                                   lr_schedule=args.lr_schedule, seed=split, **sched, **stop)
                with torch.no_grad():
                    train_rmse = float((fit.model(X) - y).square().mean().sqrt())
                trace = [round(v, 2) for v in fit.history["log_marglik"] if not math.isnan(v)]
                report("lanam", *_la_predict(fit.la, Xt), fit.seconds,
                       precisions=fit.feature_precisions.round(decimals=3).tolist(),
                       sigma=float(fit.la.sigma_noise), train_rmse=train_rmse,
                       log_marglik=max(trace), log_marglik_trace=trace,
                       epochs_run=fit.epochs_run,
                       steps_run=fit.epochs_run * math.ceil(n / args.batch_size))
                if "lanam_int" in args.methods:
                    k = min(5, d * (d - 1) // 2)
                    fit2 = fit_interactions(fit, X, y, k, seed=split)
                    report("lanam_int", *_la_predict(fit2.la, Xt), fit.seconds + fit2.seconds,
                           pairs=fit2.model.pairs, pair_precisions=fit2.pair_precisions
                           .round(decimals=3).tolist())
            if "nam" in args.methods:
                t = time.perf_counter()
                model, s2 = _plain_nam(X, y, sched, tuple(args.hidden), split)
                with torch.no_grad():
                    mean = model(Xt)[:, 0].numpy()
                report("nam", mean, np.full_like(mean, s2), time.perf_counter() - t)
            if "mlp" in args.methods:
                t = time.perf_counter()
                la = _mlp(X, y, sched, split)
                report("mlp", *_la_predict(la, Xt), time.perf_counter() - t)
            Xn, yn, Xtn = s.X_train.numpy(), s.y_train[:, 0].numpy(), s.X_test.numpy()
            if "laplace_regressor" in args.methods:
                from marglik import LaplaceRegressor

                t = time.perf_counter()
                reg = LaplaceRegressor(random_state=split).fit(Xn, yn)
                mean, std = reg.predict(Xtn, return_std=True)
                report("laplace_regressor", mean, std**2, time.perf_counter() - t)
            if "hgb" in args.methods:
                t = time.perf_counter()
                hgb = HistGradientBoostingRegressor(random_state=split)
                oof = cross_val_predict(hgb, Xn, yn, cv=5)
                mean = hgb.fit(Xn, yn).predict(Xtn)
                report("hgb", mean, np.full_like(mean, np.mean((oof - yn) ** 2)),
                       time.perf_counter() - t)
            if "gam" in args.methods and LinearGAM is not None:
                t = time.perf_counter()
                gam = LinearGAM().gridsearch(Xn, yn, progress=False)
                mean = gam.predict(Xtn)
                lo, hi = gam.prediction_intervals(Xtn, width=0.95).T
                std = (hi - lo) / (2 * 1.959964)
                report("gam", mean, std**2, time.perf_counter() - t)


# ------------------------------------------------------------------------- classification
def run_classification(args) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from marglik.applications.additive import LaplaceAdditiveClassifier
    from marglik.metrics import ece, nll

    try:
        from pygam import LogisticGAM
    except ImportError:
        LogisticGAM = None
    X, y = load_breast_cancer(return_X_y=True)
    for seed in args.seeds:
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
        sc = StandardScaler().fit(Xtr)
        Xtr, Xte = sc.transform(Xtr), sc.transform(Xte)
        sched = schedule(len(Xtr), args.steps, args.batch_size, args.min_epochs, args.updates)
        models = {"lanam": LaplaceAdditiveClassifier(hidden=tuple(args.hidden), random_state=seed,
                                                     **sched),
                  "logreg": LogisticRegression(C=1.0, max_iter=1000)}
        if LogisticGAM is not None:
            models["gam"] = None
        for method, model in models.items():
            t = time.perf_counter()
            if method == "gam":
                gam = LogisticGAM(n_splines=8).gridsearch(Xtr, ytr, progress=False,
                                                          lam=np.logspace(-3, 3, 5))
                p1 = gam.predict_proba(Xte)
                probs = np.stack([1 - p1, p1], 1)
            else:
                probs = model.fit(Xtr, ytr).predict_proba(Xte)
            seconds = time.perf_counter() - t
            pt, yt = torch.tensor(probs, dtype=torch.float64), torch.tensor(yte)
            emit(dict(exp="classification", set="breast_cancer", seed=seed, method=method,
                      accuracy=float((probs.argmax(1) == yte).mean()), nll=float(nll(pt, yt)),
                      ece=float(ece(pt, yt)), seconds=round(seconds, 1)), args.out)


def tables(path: str) -> None:
    """Markdown tables (mean ± standard error over seeds / splits) from a JSON-lines file."""
    rows = [json.loads(line) for line in open(path) if line.strip()]

    def ms(v):
        v = np.asarray(v, dtype=float)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return f"{v.mean():.3f} ± {se:.3f}"

    syn = [r for r in rows if r["exp"] == "synthetic"]
    if syn:
        print("| N | runs | min noise δ / max informative δ | shape RMSE (informative) | "
              "95 % band coverage (informative / noise) | test RMSE | σ | s per fit |")
        print("|---|---|---|---|---|---|---|---|")
        for n in sorted({r["n"] for r in syn}):
            rs = [r for r in syn if r["n"] == n]
            ratios = ", ".join(f"{r['ratio_noise_informative']:.1f}" for r in rs)
            print(f"| {n} | {len(rs)} | {ratios}"
                  f" | {ms([r['shape_rmse_informative'] for r in rs])} | "
                  f"{ms([r['coverage_informative'] for r in rs])} / "
                  f"{ms([r['coverage_noise'] for r in rs])} | {ms([r['test_rmse'] for r in rs])} | "
                  f"{ms([r['sigma'] for r in rs])} | {ms([r['seconds'] for r in rs])} |")
    uci = [r for r in rows if r["exp"] == "uci"]
    if uci:
        methods = [m for m in ["lanam", "lanam_int", "nam", "mlp", "laplace_regressor", "hgb",
                               "gam"]
                   if any(r["method"] == m for r in uci)]
        for metric in ("ll", "rmse", "seconds"):
            print(f"\n{metric}\n\n| set | splits | " + " | ".join(methods) + " |")
            print("|---|---|" + "---|" * len(methods))
            for name in dict.fromkeys(r["set"] for r in uci):
                cells = []
                for m in methods:
                    v = [r[metric] for r in uci if r["set"] == name and r["method"] == m]
                    cells.append(ms(v) if v else "—")
                n_splits = len({r["split"] for r in uci if r["set"] == name})
                print(f"| {name} | {n_splits} | " + " | ".join(cells) + " |")
    if uci and any(r["method"] == "lanam" for r in uci):
        print("\npaired test log-likelihood differences, lanam minus each reference, over the "
              "splits both ran (mean ± se; wins = splits where lanam ≥ the reference)\n")
        refs = [m for m in ("gam", "laplace_regressor") if any(r["method"] == m for r in uci)]
        print("| set | " + " | ".join(f"splits, lanam − {m}, wins" for m in refs) + " |")
        print("|---|" + "---|" * len(refs))
        for name in dict.fromkeys(r["set"] for r in uci):
            ll = {(r["method"], r["split"]): r["ll"] for r in uci if r["set"] == name}
            cells = []
            for m in refs:
                splits = sorted(s for (k, s) in ll if k == "lanam" and (m, s) in ll)
                diff = [ll["lanam", s] - ll[m, s] for s in splits]
                cells.append(f"{len(splits)}, {ms(diff)}, {sum(d >= 0 for d in diff)}"
                             if diff else "—")
            print(f"| {name} | " + " | ".join(cells) + " |")
    cls = [r for r in rows if r["exp"] == "classification"]
    if cls:
        print("\n| method | runs | accuracy | NLL | ECE | s per fit |\n|---|---|---|---|---|---|")
        for m in dict.fromkeys(r["method"] for r in cls):
            rs = [r for r in cls if r["method"] == m]
            print(f"| {m} | {len(rs)} | {ms([r['accuracy'] for r in rs])} | "
                  f"{ms([r['nll'] for r in rs])} | {ms([r['ece'] for r in rs])} | "
                  f"{ms([r['seconds'] for r in rs])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=["synthetic", "uci", "classification", "table"])
    p.add_argument("--n", type=int, nargs="+", default=[500, 5000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sets", nargs="+", default=UCI_SETS)
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+",
                   default=["lanam", "lanam_int", "nam", "mlp", "hgb", "gam"])
    p.add_argument("--hidden", type=int, nargs="+", default=[64])
    p.add_argument("--activation", default="relu")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="θ's learning-rate schedule of the lanam runs (uci)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of the network runs (uci)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--min-epochs", type=int, default=50)
    p.add_argument("--updates", type=int, default=10,
                   help="evidence updates per --steps (their spacing)")
    p.add_argument("--patience", type=int, default=None,
                   help="uci lanam: stop once the best log evidence has not risen by --min-delta "
                        "in this many evidence updates (fit_additive's rule); then --max-steps "
                        "is the maximum and --steps only sets the spacing of the updates")
    p.add_argument("--min-delta", type=float, default=1.0, help="nats, with --patience")
    p.add_argument("--max-steps", type=int, default=8000, help="with --patience")
    p.add_argument("--figure", default=None, help="folder for the synthetic shape plots")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args()
    if args.experiment == "table":  # Markdown tables from --out
        tables(args.out)
        return
    torch.set_num_threads(1)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
    {"synthetic": run_synthetic, "uci": run_uci,
     "classification": run_classification}[args.experiment](args)


if __name__ == "__main__":
    main()
