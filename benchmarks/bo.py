"""Bayesian-optimisation regret benchmark: marglik's linearised-Laplace surrogate vs BoTorch's
SingleTaskGP, laplace-bayesopt 0.1.7 and random search (Kristiadi et al., AABI 2023).

One JSON line per run: function, method, seed, the simple regret after every evaluation
(best value found minus the optimum, minimisation), and the wall time of every BO iteration
(surrogate fit + acquisition optimisation). Inputs are scaled to the unit cube; every model
maximises −f with analytic LogEI (q = 1, 5 restarts, 256 raw samples).

    nice python benchmarks/bo.py --function branin --method marglik --seeds 0 1 2 \
        --n-init 10 --n-evals 40
    # laplace-bayesopt lives in its own venv (it needs laplace-torch):
    nice /work/bo-venv/bin/python benchmarks/bo.py --function branin --method lbo ...
    python benchmarks/bo.py --plot results.jsonl        # figures/bo_regret.png
    python benchmarks/bo.py --table results.jsonl       # Markdown table
    python benchmarks/bo.py --pitfall                   # figures/bo_pitfall.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
DT = torch.float64
FIGURES = Path(__file__).parent / "figures"


class StepSphere:
    """A discontinuous test function: f(x) = Σ_i round(x_i)², x ∈ [−5.12, 5.12]^d (De Jong's
    step function in its rounded form); minimum 0 on the cube |x_i| < 0.5."""

    def __init__(self, dim: int = 6):
        self.dim = dim
        self.bounds = torch.tensor([[-5.12] * dim, [5.12] * dim], dtype=DT)
        self.optimal_value = 0.0

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return torch.round(X).square().sum(-1)


def test_function(name: str):
    """(f to minimise on its bounds, bounds (2, d), optimal value)."""
    from botorch.test_functions import Ackley, Branin, Hartmann

    if name == "branin":
        f = Branin()
    elif name == "hartmann6":
        f = Hartmann(dim=6)
    elif name == "ackley10":
        f = Ackley(dim=10)
    elif name == "stepsphere6":
        f = StepSphere(6)
        return f, f.bounds, f.optimal_value
    else:
        raise ValueError(f"unknown function {name!r}")
    f = f.to(DT)
    return (lambda X: f.evaluate_true(X)), f.bounds.to(DT), float(f.optimal_value)


def make_model(method: str, X: torch.Tensor, Y: torch.Tensor, previous, seed: int):
    """The surrogate after the data (X, Y) (Y to maximise), warm-started where it can be."""
    if method == "gp":
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Standardize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        gp = SingleTaskGP(X, Y, outcome_transform=Standardize(m=1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        return gp
    if method == "marglik":
        from marglik.applications.bo import LaplaceSurrogate

        if previous is None:
            # noiseless test functions: σ fixed at 0.05 (standardised units), δ by the evidence
            return LaplaceSurrogate(X, Y, seed=seed, noise_std=0.05)
        n_old = previous.train_inputs.shape[0]
        return previous.condition_on_observations(X[n_old:], Y[n_old:])
    if method == "lbo":
        from botorch.models.transforms import Standardize
        from laplace_bayesopt.botorch import LaplaceBoTorch
        from torch import nn

        d = X.shape[-1]

        def get_net():
            return nn.Sequential(nn.Linear(d, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                                 nn.Linear(50, 1)).to(DT)

        if previous is None:
            return LaplaceBoTorch(get_net, X, Y, outcome_transform=Standardize(m=1))
        n_old = previous.orig_train_X.shape[0]
        return previous.condition_on_observations(X[n_old:], Y[n_old:])
    raise ValueError(f"unknown method {method!r}")


def run(function: str, method: str, seed: int, n_init: int, n_evals: int) -> dict:
    """One BO run; regret after each of the n_init + n_evals evaluations."""
    from botorch.acquisition import LogExpectedImprovement
    from botorch.optim import optimize_acqf

    f, bounds, f_opt = test_function(function)
    d = bounds.shape[1]
    unit = torch.stack([torch.zeros(d, dtype=DT), torch.ones(d, dtype=DT)])
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n_init, d, generator=g, dtype=DT)

    def evaluate(Xu):
        return -f(bounds[0] + (bounds[1] - bounds[0]) * Xu).reshape(-1, 1)

    Y = evaluate(X)
    times, model = [], None
    for i in range(n_evals):
        torch.manual_seed(seed * 100003 + i)
        t0 = time.perf_counter()
        if method == "random":
            x = torch.rand(1, d, generator=g, dtype=DT)
        else:
            model = make_model(method, X, Y, model, seed)
            acq = LogExpectedImprovement(model, best_f=Y.max())
            x, _ = optimize_acqf(acq, unit, q=1, num_restarts=5, raw_samples=256)
            x = x.detach()
        times.append(time.perf_counter() - t0)
        X, Y = torch.cat([X, x]), torch.cat([Y, evaluate(x)])
    best = torch.cummax(Y[:, 0], 0).values
    regret = (-best - f_opt).tolist()
    return {"function": function, "method": method, "seed": seed, "n_init": n_init,
            "n_evals": n_evals, "regret": regret, "iter_seconds": times,
            "mean_iter_seconds": sum(times) / max(len(times), 1)}


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    functions = list(dict.fromkeys(r["function"] for r in rows))
    fig, axes = plt.subplots(1, len(functions), figsize=(3.6 * len(functions), 3.0))
    for ax, fn in zip(list(axes) if len(functions) > 1 else [axes], functions):
        for method in ("random", "gp", "lbo", "marglik"):
            runs = [r["regret"] for r in rows if r["function"] == fn and r["method"] == method]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            R = torch.tensor([r[:n] for r in runs]).clamp_min(1e-6).log10()
            mean = R.mean(0)
            se = R.std(0) / math.sqrt(R.shape[0]) if R.shape[0] > 1 else torch.zeros(n)
            steps = torch.arange(1, n + 1)
            label = {"gp": "SingleTaskGP", "lbo": "laplace-bayesopt", "marglik": "marglik LA",
                     "random": "random"}[method]
            ax.plot(steps, mean, label=f"{label} ({len(runs)})")
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_title(fn)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("log10 simple regret")
    axes_list = list(axes) if len(functions) > 1 else [axes]
    axes_list[0].legend(fontsize=7)
    fig.tight_layout()
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / "bo_regret.png", dpi=80)


def table(path: str) -> None:
    """Markdown table: per function and method, runs, evaluations, final regret, s/iteration."""
    rows = [json.loads(line) for line in open(path) if line.startswith('{"function"')]
    print("| function | method | seeds | evaluations | final simple regret per seed | "
          "regret after 10 + 15, per seed | mean s / iteration | over the first 15 |")
    print("|---|---|---|---|---|---|---|---|")
    for fn in dict.fromkeys(r["function"] for r in rows):
        for method in ("random", "gp", "lbo", "marglik"):
            runs = [r for r in rows if r["function"] == fn and r["method"] == method]
            if not runs:
                continue
            regrets = ", ".join(f"{r['regret'][-1]:.3g}" for r in runs)
            at15 = ", ".join(f"{r['regret'][r['n_init'] + 14]:.3g}" for r in runs
                             if len(r["regret"]) >= r["n_init"] + 15)
            secs = sum(r["mean_iter_seconds"] for r in runs) / len(runs)
            first = sum(sum(r["iter_seconds"][:15]) / len(r["iter_seconds"][:15])
                        for r in runs) / len(runs)
            print(f"| {fn} | {method} | {len(runs)} | {runs[0]['n_init']} + "
                  f"{runs[0]['n_evals']} | {regrets} | {at15} | {secs:.3g} | {first:.3g} |")


def pitfall() -> None:
    """The unbounded-search-space pitfall: the linearised-Laplace std of a ReLU network grows
    linearly away from the data, so an unbounded acquisition runs off to infinity; a GP's std
    with a stationary kernel returns to the prior's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    from marglik.applications.bo import LaplaceSurrogate

    g = torch.Generator().manual_seed(0)
    X = torch.rand(12, 1, generator=g, dtype=DT)
    Y = torch.sin(6 * X) + 0.05 * torch.randn(12, 1, generator=g, dtype=DT)
    la = LaplaceSurrogate(X, Y, seed=0, noise_std=0.05)
    gp = SingleTaskGP(X, Y, outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    xs = torch.linspace(-20, 21, 801, dtype=DT)[:, None, None]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, model, name in ((axes[0], la, "marglik linearised Laplace (ReLU 50-50)"),
                            (axes[1], gp, "SingleTaskGP (Matérn-5/2)")):
        with torch.no_grad():
            post = model.posterior(xs)
        m, s = post.mean.reshape(-1), post.variance.reshape(-1).sqrt()
        ax.plot(xs.reshape(-1), m, lw=1)
        ax.fill_between(xs.reshape(-1), m - 2 * s, m + 2 * s, alpha=0.3)
        ax.scatter(X[:, 0], Y[:, 0], s=8, c="k", zorder=3)
        ax.axvspan(0, 1, color="gray", alpha=0.15)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x (data in the shaded [0, 1])")
        print(json.dumps({"pitfall": name, "std_at_x=0.5": float(s[400]),
                          "std_at_x=-20": float(s[0]), "std_at_x=21": float(s[-1])}))
    axes[0].set_ylabel("mean ± 2 std")
    fig.tight_layout()
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / "bo_pitfall.png", dpi=80)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--function", default="branin",
                   choices=["branin", "hartmann6", "ackley10", "stepsphere6"])
    p.add_argument("--method", default="marglik", choices=["random", "gp", "marglik", "lbo"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-init", type=int, default=10)
    p.add_argument("--n-evals", type=int, default=100)
    p.add_argument("--plot", help="a JSON-lines file of results to plot")
    p.add_argument("--pitfall", action="store_true")
    p.add_argument("--table", help="a JSON-lines file of results: print a Markdown table")
    args = p.parse_args(argv)
    if args.plot:
        return plot(args.plot)
    if args.pitfall:
        return pitfall()
    if args.table:
        return table(args.table)
    warnings.filterwarnings("ignore")
    for seed in args.seeds:
        print(json.dumps(run(args.function, args.method, seed, args.n_init, args.n_evals)),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
