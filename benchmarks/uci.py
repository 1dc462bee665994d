"""UCI regression: MAP+CV, homo-/heteroscedastic online evidence and post-hoc Laplace.

For every data set found under the UCI root (``marglik.data.default_uci_root``) and the standard
splits, a 1×50 GELU MLP is trained four ways, every training run with the same optimiser budget:

  map      MAP (Gaussian, σ = 1 in standardised units) with the prior precision δ chosen by 5-fold
           cross-validation (validation MSE) over ``--grid``; test σ² = that δ's mean CV MSE.
  homo     online evidence training (marglik_training, Gaussian, layer-wise δ, KFAC, σ learned).
  hetero   online evidence training with NaturalGaussian (layer-wise δ, KFAC, no σ).
  posthoc  post-hoc Laplace on ``map`` (KFAC, layer-wise δ and σ by the evidence, GLM predictive).

Budget (:func:`schedule`): about ``--steps`` Adam steps (lr ``--lr``) per training run with batches
of ``--batch-size``; where that would cover fewer than ``--min-epochs`` epochs (the large sets), the
batch size grows so that every run sees at least ``--min-epochs`` epochs, since the evidence
burn-in (``--burnin-frac`` of the epochs) and the ``--n-updates`` evidence updates are counted in
epochs. The CV runs use the same batch size and epochs on 4/5 of the data.

Metrics are in original target units: test log-likelihood per point (− log y_std) and RMSE
(× y_std); wall time per method (map and posthoc include the CV). Jobs (data set, split) run in
``--workers`` spawned processes with one torch thread each: splits 0..``--splits``−1 of every set
first, then further splits up to ``--max-splits`` while ``--stop-after`` seconds have not passed.
A method that raises is recorded with its error and left out of the means. Results go to ``--out``
as JSON lines; Markdown tables are printed.

    python benchmarks/uci.py --splits 5 --max-splits 20 --stop-after 5500 --steps 1500 \
        --min-epochs 10 --lr 1e-2 --workers 2 --out benchmarks/uci-results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import date

import torch
from torch import nn


class Loader:
    """Shuffled mini-batches of in-memory tensors (cheaper than a DataLoader per index)."""

    def __init__(self, x, y, batch_size, seed=0):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset = torch.utils.data.TensorDataset(x, y)  # for len()
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)


def mlp(d_in, d_out, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 50), nn.GELU(), nn.Linear(50, d_out))


def gauss_ll(mean, var, y):
    return (-0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean().item()


def schedule(n, steps, batch_size, min_epochs):
    """Batch size, batches per epoch and epochs for a training run of about ``steps`` Adam steps.

    Small sets keep ``batch_size`` and get many epochs; when ``steps`` batches of ``batch_size``
    would cover fewer than ``min_epochs`` epochs of the ``n`` points (the big sets), the batch size
    grows instead, so every run sees at least ``min_epochs`` epochs (the evidence burn-in and
    update frequency are counted in epochs) at roughly the same number of optimiser steps.
    """
    bs = max(batch_size, math.ceil(min_epochs * n / steps))
    bs = min(bs, n)
    per_epoch = math.ceil(n / bs)
    epochs = max(min_epochs, round(steps / per_epoch))
    return bs, per_epoch, epochs


def evidence_kwargs(cfg, epochs):
    """Algorithm 1 settings for ``epochs`` epochs: burn-in, then ``n_updates`` spaced updates."""
    burnin = max(1, round(cfg["burnin_frac"] * epochs))
    freq = max(1, (epochs - burnin) // cfg["n_updates"])
    return dict(hessian_structure="kron", prior_structure="layerwise", n_epochs=epochs,
                lr=cfg["lr"], lr_hyp=cfg["lr_hyp"], n_epochs_burnin=burnin,
                marglik_frequency=freq, n_hypersteps=cfg["n_hypersteps"],
                prior_prec_init=cfg["prior_prec_init"])


def run_job(job):
    torch.set_num_threads(1)
    if job.get("deadline") and time.time() > job["deadline"]:
        return []  # --stop-after reached: skip jobs that have not started
    from marglik.applications.heteroscedastic import heteroscedastic_predictive
    from marglik.data import load_uci
    from marglik.likelihoods import NaturalGaussian
    from marglik.posterior import Laplace
    from marglik.training import marglik_training, train_map

    name, split, cfg = job["name"], job["split"], job["cfg"]
    methods = cfg.get("methods", METHODS)
    d = load_uci(name, split)
    X, y = d.X_train, d.y_train
    note = ""
    if cfg["max_train"] and len(X) > cfg["max_train"]:
        idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(split))
        X, y = X[idx[:cfg["max_train"]]], y[idx[:cfg["max_train"]]]
        note = f"train subsampled to {cfg['max_train']}"
    Xt, yt = d.X_test, d.y_test.squeeze(-1)
    ys, log_ys = d.y_std.item(), math.log(d.y_std.item())
    n, D = X.shape
    bs, per_epoch, epochs = schedule(n, cfg["steps"], cfg["batch_size"], cfg["min_epochs"])
    lr = cfg["lr"]
    res = []

    def record(method, mean, var, seconds, **extra):
        res.append({
            "dataset": name, "split": split, "method": method, "n_train": n, "n_test": len(yt),
            "test_ll": gauss_ll(mean, var, yt) - log_ys,
            "test_rmse": ((mean - yt) ** 2).mean().sqrt().item() * ys,
            "seconds": seconds, "epochs": epochs, "batch_size": bs,
            "steps": epochs * per_epoch, "note": note, "loadavg": os.getloadavg()[0], **extra,
        })

    def failed(method, error, seconds):
        res.append({"dataset": name, "split": split, "method": method, "n_train": n,
                    "n_test": len(yt), "test_ll": float("nan"), "test_rmse": float("nan"),
                    "seconds": seconds, "epochs": epochs, "batch_size": bs, "note": note,
                    "error": f"{type(error).__name__}: {error}"[:300]})

    if "map" in methods or "posthoc" in methods:
        # (a) MAP, δ by 5-fold CV on validation MSE (same batch size and epochs as the final fit)
        t0 = time.perf_counter()
        folds = torch.randperm(n, generator=torch.Generator().manual_seed(100 + split)).chunk(5)
        cv = {}
        for delta in cfg["grid"]:
            mses = []
            for k in range(5):
                val = folds[k]
                tr = torch.cat([folds[j] for j in range(5) if j != k])
                m = mlp(D, 1, split)
                train_map(m, Loader(X[tr], y[tr], bs, split), "regression", epochs, lr,
                          prior_precision=delta)
                with torch.no_grad():
                    mses.append(((m(X[val]) - y[val]) ** 2).mean().item())
            cv[delta] = sum(mses) / len(mses)
        delta_map = min(cv, key=cv.get)
        m_map = mlp(D, 1, split)
        train_loader = Loader(X, y, bs, split)
        train_map(m_map, train_loader, "regression", epochs, lr, prior_precision=delta_map)
        with torch.no_grad():
            mean = m_map(Xt).squeeze(-1)
        t_map = time.perf_counter() - t0
        record("map", mean, torch.full_like(mean, cv[delta_map]), t_map, delta=delta_map,
               cv_mse={str(k): v for k, v in cv.items()})

        # (d) post-hoc Laplace on (a)
        t0 = time.perf_counter()
        try:
            la = Laplace(m_map, "regression", "all", "kron", prior_precision=delta_map,
                         sigma_noise=math.sqrt(cv[delta_map])).fit(train_loader)
            la.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                        tune_sigma=True, n_steps=cfg["posthoc_steps"])
            fm, fv = la(Xt, pred_var=True)
            record("posthoc", fm.squeeze(-1).detach(), fv[:, 0, 0].detach(),
                   time.perf_counter() - t0 + t_map, sigma=la.sigma_noise.item())
        except Exception as e:  # noqa: BLE001 - a failed method is recorded, not fatal
            failed("posthoc", e, time.perf_counter() - t0 + t_map)

    ev = evidence_kwargs(cfg, epochs)
    if "homo" in methods:
        # (b) homoscedastic online evidence
        t0 = time.perf_counter()
        try:
            la_b, _, h = marglik_training(mlp(D, 1, split), Loader(X, y, bs, split),
                                          "regression", **ev)
            fm, fv = la_b(Xt, pred_var=True)
            record("homo", fm.squeeze(-1).detach(), fv[:, 0, 0].detach(),
                   time.perf_counter() - t0, sigma=la_b.sigma_noise.item(), **_trace(h))
        except Exception as e:  # noqa: BLE001
            failed("homo", e, time.perf_counter() - t0)

    if "hetero" in methods:
        # (c) heteroscedastic online evidence
        t0 = time.perf_counter()
        try:
            la_c, _, h = marglik_training(mlp(D, 2, split), Loader(X, y, bs, split),
                                          NaturalGaussian(cfg["positivity"]), **ev)
            p = heteroscedastic_predictive(la_c, Xt)
            record("hetero", p.mean, p.predictive_var, time.perf_counter() - t0,
                   test_ll_plugin=gauss_ll(p.mean, p.aleatoric_var, yt) - log_ys,
                   mean_epistemic_var=p.epistemic_var.mean().item() * ys**2,
                   mean_aleatoric_var=p.aleatoric_var.mean().item() * ys**2, **_trace(h))
        except Exception as e:  # noqa: BLE001
            failed("hetero", e, time.perf_counter() - t0)
    return res


def _trace(history):
    """Best evidence, the epoch it was reached and the final training loss of an online run."""
    lml = history["log_marglik"]
    valid = [(v, e) for e, v in enumerate(lml) if not math.isnan(v)]
    best, epoch = max(valid) if valid else (float("nan"), -1)
    return {"log_marglik": best, "best_epoch": epoch, "final_loss": history["loss"][-1]}


METHODS = ["map", "posthoc", "homo", "hetero"]


def table(rows, key, fmt):
    import statistics as st

    sets = sorted({r["dataset"] for r in rows})
    lines = ["| data set | N train | splits | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for s in sets:
        cells = []
        for m in METHODS:
            sel = [r for r in rows if r["dataset"] == s and r["method"] == m]
            v = [r[key] for r in sel if "error" not in r]
            if not v:
                cells.append("–")
                continue
            se = st.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            fails = len(sel) - len(v)
            fail = f" ({fails} failed)" if fails else ""
            cells.append(f"{st.mean(v):{fmt}} ± {se:{fmt}}{fail}")
        sub = [r for r in rows if r["dataset"] == s]
        ntr = str(sub[0]["n_train"]) + (" (sub)" if sub[0]["note"] else "")
        nsp = len({r["split"] for r in sub})
        lines.append(f"| {s} | {ntr} | {nsp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--big-splits", type=int, default=None,
                    help="splits for the four large sets (default: --splits)")
    ap.add_argument("--max-splits", type=int, default=None,
                    help="after --splits splits of every set, add further splits up to this many")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="seconds after which no further (beyond --splits) job is started")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=2000,
                    help="Adam steps per training run (about; see --min-epochs)")
    ap.add_argument("--min-epochs", type=int, default=10,
                    help="grow the batch size so that every run covers at least this many epochs")
    ap.add_argument("--batch-size", type=int, default=128, help="smallest batch size")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lr-hyp", type=float, default=0.1)
    ap.add_argument("--n-updates", type=int, default=10, help="evidence updates per run")
    ap.add_argument("--n-hypersteps", type=int, default=50, help="hyper-steps per update")
    ap.add_argument("--prior-prec-init", type=float, default=1.0,
                    help="initial δ of the online evidence runs")
    ap.add_argument("--burnin-frac", type=float, default=0.1, help="burn-in, fraction of epochs")
    ap.add_argument("--posthoc-steps", type=int, default=200)
    ap.add_argument("--positivity", default="softplus", choices=["softplus", "exp"])
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--max-train", type=int, default=0,
                    help="subsample larger training sets (0: use the full training sets)")
    ap.add_argument("--grid", type=float, nargs="*", default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/uci-results.jsonl")
    args = ap.parse_args(argv)

    from marglik.data import n_uci_splits, uci_datasets

    try:
        names = uci_datasets()
    except FileNotFoundError as e:
        print(f"skipping the UCI benchmark: {e}")
        return 0
    if args.datasets:
        names = [s for s in names if s in args.datasets]
    big = {"kin8nm", "naval-propulsion-plant", "power-plant", "protein-tertiary-structure"}
    cfg = {k: getattr(args, k) for k in (
        "steps", "min_epochs", "batch_size", "lr", "lr_hyp", "n_updates", "n_hypersteps",
        "burnin_frac", "prior_prec_init", "posthoc_steps", "positivity", "methods", "max_train",
        "grid")}
    # splits 0..splits-1 of every set first (large sets first within a split, so the pool does not
    # end on a straggler), then further splits up to --max-splits, round-robin over the sets,
    # started only until --stop-after seconds have passed
    deadline = time.time() + args.stop_after if args.stop_after else None
    jobs = []
    for i in range(max(args.splits, args.max_splits or 0)):
        for s in sorted(names, key=lambda s: (s in big) != (i < args.splits)):
            k = args.big_splits if (s in big and args.big_splits is not None) else args.splits
            extra = i >= k
            if i >= n_uci_splits(s) or (extra and i >= (args.max_splits or 0)):
                continue
            jobs.append({"name": s, "split": i, "cfg": cfg,
                         "deadline": deadline if extra else None})
    import marglik

    print(f"{len(jobs)} jobs on {args.workers} workers (marglik from {marglik.__file__}): {cfg}",
          flush=True)
    t0 = time.perf_counter()
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool, open(args.out, "w") as f:
        for res in pool.imap_unordered(run_job, jobs):
            if not res:
                continue
            for r in res:
                f.write(json.dumps(r) + "\n")
            f.flush()
            rows += res
            r0 = res[0]
            print(f"[{time.perf_counter() - t0:6.0f}s] {r0['dataset']}[{r0['split']}] "
                  + " ".join(f"{r['method']}={r['test_ll']:.2f}/{r['seconds']:.0f}s" for r in res),
                  flush=True)
    print(f"\ntotal wall {time.perf_counter() - t0:.0f}s; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {date.today()}")
    print("\nTest log-likelihood (original units, mean ± s.e.)\n")
    print(table(rows, "test_ll", ".3f"))
    print("\nTest RMSE (original units, mean ± s.e.)\n")
    print(table(rows, "test_rmse", ".3f"))
    print("\nWall seconds per (split, method)\n")
    print(table(rows, "seconds", ".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
