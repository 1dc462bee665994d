"""The calibration study's rows with laplace-torch 0.3: same networks, weights, data and batches.

    lt-venv/bin/python benchmarks/calibration_laplace_torch.py --seeds 0 \
        --out marglik-out/calibration/laplace-torch.jsonl [--only ...] [--quick ...]

Run it with laplace-torch's own virtualenv (``benchmarks/README.md``, "Side by side with
laplace-torch") after ``benchmarks/calibration_study.py`` has trained and cached the networks:
this script never trains, it loads the cached weights (``--cache``), builds the same evaluation
sets with :func:`calibration_study.load_study_data`, scores them with the same
:func:`calibration_study.evaluate` and writes the same JSON lines (``"library":
"laplace-torch"``), so one table holds both libraries for every row.

Each row uses laplace-torch's public API as a user would: ``Laplace(model, "classification",
subset_of_weights=..., hessian_structure=...)`` with its default curvature backend, ``fit`` on
the same unshuffled loader, ``optimize_prior_precision(method="marglik",
prior_structure=...)`` with its defaults otherwise, and ``la(x, pred_type=...,
link_approx=...)`` in chunks small enough for its ``jacrev`` Jacobians (25 inputs for LeNet).
The probit and MC links of one posterior share the GLM moments:
``_glm_predictive_distribution`` is memoised per evaluation set and chunk, so laplace-torch's
own link code runs on the moments it computed once.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_study as cs  # noqa: E402

LT_ROWS: dict[str, cs.RowFn] = {}
#: inputs per laplace-torch all-weights predictive call for LeNet (44,426 parameters): its
#: ``jacrev`` Jacobians hold B·C copies of the activations (100 inputs needed 1.4 GB at once)
_ALL_WEIGHTS_CHUNK = 25


def lt_posterior(ctx: cs.Context, subset: str, structure: str, prior: str):
    """laplace-torch posterior: fitted once per (subset, structure); δ re-tuned from 1 whenever
    a row asks for another prior structure (a deep copy of a fitted last-layer posterior
    loses its feature hook in laplace-torch 0.3, so the fitted object is reused)."""
    from laplace import Laplace

    def fit():
        la = Laplace(ctx.model, "classification", subset_of_weights=subset,
                     hessian_structure=structure)
        la.fit(ctx.train_loader)
        return _memoise_moments(la)

    la = cs.timed(ctx, f"fit:{subset}-{structure}", fit)
    if getattr(la, "_study_prior", None) != prior:
        t0 = time.perf_counter()
        la._study_prior = None
        la.optimize_prior_precision(method="marglik", prior_structure=prior, init_prior_prec=1.0)
        la._study_prior = prior
        ctx.timings[f"tune:{subset}-{structure}-{prior}"] = round(time.perf_counter() - t0, 2)
    ctx.cache[f"tune:{subset}-{structure}-{prior}"] = la
    return la


def _memoise_moments(la):
    """Cache ``la._glm_predictive_distribution`` by the key set in ``la._study_key``."""
    original = la._glm_predictive_distribution
    store: dict = {}

    @functools.wraps(original)
    def cached(X, joint=False, diagonal_output=False):
        key = (getattr(la, "_study_key", None), la._study_prior, joint, diagonal_output)
        if key[0] is None:
            return original(X, joint=joint, diagonal_output=diagonal_output)
        if key not in store:
            store[key] = original(X, joint=joint, diagonal_output=diagonal_output)
        return store[key]

    la._glm_predictive_distribution = cached
    return la


def _chunk(ctx: cs.Context, subset: str) -> int:
    if subset != "all":
        return 1000
    n_params = sum(p.numel() for p in ctx.model.parameters())
    return max(1, int(_ALL_WEIGHTS_CHUNK * 44_426 / n_params))


def lt_row(subset: str, structure: str, prior: str, link: str) -> cs.RowFn:
    def row(ctx: cs.Context) -> cs.Predictor:
        la = lt_posterior(ctx, subset, structure, prior)
        step = _chunk(ctx, subset)

        def predict(name: str, x: Tensor) -> Tensor:
            torch.manual_seed(ctx.seed)
            out = []
            for i in range(0, len(x), step):
                la._study_key = (name, i)
                if link == "nn":
                    p = la(x[i:i + step], pred_type="nn", link_approx="mc",
                           n_samples=ctx.nn_samples)
                else:
                    p = la(x[i:i + step], pred_type="glm", link_approx=link,
                           n_samples=ctx.n_samples)
                out.append(p.detach())
            la._study_key = None
            return torch.cat(out)

        return predict

    return row


cs.register_row("map", cs.map_row, LT_ROWS)
for _short, _subset, _structure in cs.POSTERIORS:
    for _prior in cs.PRIORS:
        for _link in cs.LINKS:
            cs.register_row(f"{_short}-{_structure}-{_prior}-{_link}",
                            lt_row(_subset, _structure, _prior, _link), LT_ROWS)


def main(argv=None) -> None:
    torch.set_num_threads(1)
    args = cs.parse_args(argv, LT_ROWS)
    data = cs.load_study_data(args.data, args.n_train, args.n_test, args.n_ood,
                              tuple(args.angles))
    import laplace

    env = {**cs.environment(), "laplace_torch": getattr(laplace, "__version__", "0.3")}
    emit = cs.emitter(args, env)
    names = cs.selected_rows(args, LT_ROWS)
    for seed in args.seeds:
        for net in args.nets:
            if net == "ccexam" and (seed != args.seeds[0] or args.data != "mnist"):
                continue
            model, info = cs.get_net(net, data, args, seed, train=False)
            t0 = time.perf_counter()
            cs.run_rows("laplace-torch", LT_ROWS, names, net, model, info, data, args, seed,
                        emit)
            print(f"# {net} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
