"""UCI regression: MAP+CV, homo-/heteroscedastic online evidence and post-hoc Laplace.

For every data set found under the UCI root (``marglik.data.default_uci_root``) and the first
``--splits`` standard splits, a 1×50 GELU MLP is trained four ways:

  map      MAP (Gaussian, σ = 1 in standardised units) with the prior precision δ chosen by 5-fold
           cross-validation (validation MSE) over ``--grid``; test σ² = that δ's mean CV MSE.
  homo     online evidence training (marglik_training, Gaussian, layer-wise δ, KFAC, σ learned).
  hetero   online evidence training with NaturalGaussian (layer-wise δ, KFAC, no σ).
  posthoc  post-hoc Laplace on ``map`` (KFAC, layer-wise δ and σ by the evidence, GLM predictive).

Metrics are in original target units: test log-likelihood per point (− log y_std) and RMSE
(× y_std); wall time per method. Jobs (data set, split) run in ``--workers`` spawned processes
with one torch thread each. Results go to ``--out`` as JSON lines; a Markdown table is printed.

    python benchmarks/uci.py --splits 5 --out benchmarks/uci-results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
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


def run_job(job):
    torch.set_num_threads(1)
    from marglik.data import load_uci
    from marglik.likelihoods import NaturalGaussian
    from marglik.methods import heteroscedastic_predictive
    from marglik.online import marglik_training
    from marglik.posterior import Laplace
    from marglik.training import train_map

    name, split, cfg = job["name"], job["split"], job["cfg"]
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
    bs = cfg["batch_size"]
    epochs = max(1, round(cfg["steps"] / math.ceil(n / bs)))
    lr = cfg["lr"]
    res = []

    def record(method, mean, var, seconds, **extra):
        res.append({
            "dataset": name, "split": split, "method": method, "n_train": n,
            "test_ll": gauss_ll(mean, var, yt) - log_ys,
            "test_rmse": ((mean - yt) ** 2).mean().sqrt().item() * ys,
            "seconds": seconds, "epochs": epochs, "note": note, **extra,
        })

    # (a) MAP, δ by 5-fold CV on validation MSE
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
    record("map", mean, torch.full_like(mean, cv[delta_map]), t_map, delta=delta_map)

    # (d) post-hoc Laplace on (a)
    t0 = time.perf_counter()
    la = Laplace(m_map, "regression", "all", "kron", prior_precision=delta_map,
                 sigma_noise=math.sqrt(cv[delta_map])).fit(train_loader)
    la.optimize_prior_precision(prior_structure="layerwise", tune_sigma=True, n_steps=200)
    fm, fv = la(Xt, pred_var=True)
    record("posthoc", fm.squeeze(-1).detach(), fv[:, 0, 0].detach(),
           time.perf_counter() - t0 + t_map, sigma=la.sigma_noise.item())

    ev = dict(hessian_structure="kron", prior_structure="layerwise", n_epochs=epochs, lr=lr,
              lr_hyp=0.1, n_epochs_burnin=max(1, epochs // 10),
              marglik_frequency=max(1, epochs // cfg["n_updates"]), n_hypersteps=50)
    # (b) homoscedastic online evidence
    t0 = time.perf_counter()
    la_b, _, _ = marglik_training(mlp(D, 1, split), Loader(X, y, bs, split), "regression", **ev)
    fm, fv = la_b(Xt, pred_var=True)
    record("homo", fm.squeeze(-1).detach(), fv[:, 0, 0].detach(), time.perf_counter() - t0,
           sigma=la_b.sigma_noise.item())

    # (c) heteroscedastic online evidence
    t0 = time.perf_counter()
    la_c, _, _ = marglik_training(mlp(D, 2, split), Loader(X, y, bs, split), NaturalGaussian(),
                                  **ev)
    p = heteroscedastic_predictive(la_c, Xt)
    record("hetero", p.mean, p.predictive_var, time.perf_counter() - t0)
    return res


METHODS = ["map", "posthoc", "homo", "hetero"]


def table(rows, key, fmt):
    import statistics as st

    sets = sorted({r["dataset"] for r in rows})
    lines = ["| data set | N train | splits | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for s in sets:
        cells = []
        for m in METHODS:
            v = [r[key] for r in rows if r["dataset"] == s and r["method"] == m]
            if not v:
                cells.append("–")
                continue
            se = st.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            cells.append(f"{st.mean(v):{fmt}} ± {se:{fmt}}")
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
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=1500, help="Adam steps per training run")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--n-updates", type=int, default=10, help="evidence updates per run")
    ap.add_argument("--max-train", type=int, default=3000, help="subsample larger train sets")
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
    cfg = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "n_updates": args.n_updates, "max_train": args.max_train, "grid": args.grid}
    jobs = []
    for s in names:
        k = args.big_splits if (s in big and args.big_splits is not None) else args.splits
        jobs += [{"name": s, "split": i, "cfg": cfg} for i in range(min(k, n_uci_splits(s)))]
    # large jobs first so the pool does not end on a straggler
    jobs.sort(key=lambda j: j["name"] not in big)
    print(f"{len(jobs)} jobs on {args.workers} workers: {cfg}", flush=True)
    t0 = time.perf_counter()
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool, open(args.out, "w") as f:
        for res in pool.imap_unordered(run_job, jobs):
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
