"""Function-space Laplace beside laplace-torch 0.3: same network, weights and data (JSON lines).

    lt-venv/bin/python benchmarks/functional_vs_laplace_torch.py                 # float32, MLP
    lt-venv/bin/python benchmarks/functional_vs_laplace_torch.py --dtype float64 --no-exact \
        --delta 2.79                                                             # float64 rows
    lt-venv/bin/python benchmarks/functional_agreement.py                        # dense float64
    lt-venv/bin/python benchmarks/functional_vs_laplace_torch.py --table a.jsonl b.jsonl  # Markdown
    options: --models mlp32 cnn --sizes 50 100 200 400 --repeats 3 --slow 10 --time-limit 300
             --rows marglik lt-functional ella same-subset

Run it with a Python that has both ``marglik`` and ``laplace-torch`` (the virtualenv of
``benchmarks/README.md``, "Side by side with laplace-torch"), single thread, one process.

Setting. sklearn digits (``marglik.data.load_digits_split``: 1,257 training / 540 test images,
1×8×8), the MLP 64-32-32-10 (3,466 parameters) and optionally (``--models cnn``: runs, but the
exact row is costly and not in ``RESULTS-functional.md``) the CNN (9,930 parameters) of
``benchmarks/vs_laplace_torch.py``, trained there (10 epochs of Adam, lr 1e-3, batch 32, seed 0).
Both libraries get deep copies of the same weights and the same DataLoader (batch 128, not
shuffled); every predictive is the GLM (linearised) Gaussian over the logits, from each
library's moments call (``functional_moments`` / ``predictive_moments``, what "predictive s"
times), scored with two links on the same moments: the plain probit
softmax(μ/√(1 + π/8 diag Σ)), laplace-torch's default, and marglik's default centred probit,
which first projects the logits to zero sum (``marglik.predictive.links.probit``; variance along
1 changes no softmax).

Rows (``kind: "row"``), all at the same fixed prior precision δ* — the optimum of marglik's
exact evidence (``FunctionalLaplace`` over all N, L-BFGS; equal to the full-GGN weight-space
evidence) unless ``--delta`` is given — and then at each library's own evidence-optimised δ
where its API has one:

- marglik ``FunctionalLaplace``: exact (one run: its N·(C−1) = 11,313-square eigendecomposition
  takes about a minute), subset of M points (``random`` and ``class``), Nyström with M
  inducing points; own δ by ``optimize_prior_precision(optimizer="lbfgs")``;
- laplace-torch ``FunctionalLaplace(n_subset=M)`` with its own subset (``SoDSampler``, seed 0),
  as shipped and with its cross-kernel fixed (:func:`fix_cross_kernel`, "K*M fixed"); own δ by
  ``optimize_prior_precision(method="marglik")`` (its defaults: 100 Adam steps, lr 0.1, from
  δ = 1; it warns that this is discouraged);
- laplace-torch ``ELLA(subsample_size=M, n_eigenvalues=M)`` (random and ``balanced=True``): a
  Nyström basis of M Jacobian rows, the GGN of all N projected on it; no evidence (its δ is
  tuned on validation data only, not done here).

Measured: fit time and predictive time on the 540 test images (median of ``--repeats`` fits of
fresh copies; the order of the two libraries alternates from one M to the next), the evidence
at δ* and at the own δ (each library's own definition: they differ, see
``RESULTS-functional.md``), test NLL, ECE (15 bins) and accuracy. ``kind: "same_subset"``
lines compare marglik's and laplace-torch's subset posteriors on the same M points (marglik's
random subset, laplace-torch's sampler replaced by ``la.indices``): the predictive at δ* and
with marglik's prior scaled by N/M (what laplace-torch's ``gp_kernel_prior_variance`` does),
against laplace-torch as shipped and with the cross-kernel fixed, so that what is left is
laplace-torch's diagonal output Hessian.

Guards. Every step runs under ``try``; an error is recorded as the row's status (laplace-torch's
evidence fails its Cholesky factorisation in float32 from M = 200 here). A row whose first fit
and predictive take longer than ``--slow`` s is not repeated, and ``SIGALRM`` stops a step after
``--time-limit`` s. The dense float64 checks are in ``benchmarks/functional_agreement.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from importlib import metadata

import torch
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik import metrics
from marglik.data import load_digits_split
from marglik.predictive.links import probit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vs_laplace_torch as vlt  # noqa: E402  (the same models and the same brief training)

BATCH = 128
ROWS = ["marglik", "lt-functional", "ella", "same-subset"]


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout


def timed(fn, limit: int):
    """(seconds, result) of fn(), stopped by SIGALRM after ``limit`` seconds."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        signal.alarm(0)


def metrics_of(probs: torch.Tensor, y: torch.Tensor, suffix: str = "") -> dict:
    p = probs.detach().double()
    p = p / p.sum(-1, keepdim=True)  # float32 rows can miss 1 by more than the check allows
    return {f"nll{suffix}": round(metrics.nll(p, y).item(), 4),
            f"ece{suffix}": round(metrics.ece(p, y).item(), 4),
            f"acc{suffix}": round(metrics.accuracy(p, y).item(), 4)}


def plain_probit(f: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """softmax(μ / √(1 + π/8 · diag Σ)): laplace-torch's ``link_approx="probit"``."""
    return (f / (1 + math.pi / 8 * cov.diagonal(dim1=-2, dim2=-1)).sqrt()).softmax(-1)


def scores(moments: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> dict:
    """NLL, ECE, accuracy of the plain probit (laplace-torch's) and of the centred probit
    (marglik's default, :func:`marglik.predictive.links.probit`) on the same moments."""
    f, cov = (t.detach().double() for t in moments)
    return {**metrics_of(plain_probit(f, cov), y), **metrics_of(probit(f, cov), y, "_centred")}


def _f(v) -> float | None:
    return None if v is None else float(f"{float(v):.6g}")


# ------------------------------------------------------------------------------- the two sides


class Marglik:
    library = "marglik"

    def __init__(self, method: str, m: int | None, subset: str = "random", nystrom: bool = False):
        self.m, self.subset, self.nystrom = m, subset, nystrom
        self.method = method

    def build(self, model, delta: float):
        names = [n for n, _ in model.named_parameters()]
        return marglik.FunctionalLaplace(
            model, "classification", prior_precision=delta, prior_groups=[names],
            n_subset=self.m, subset_method=self.subset, nystrom=self.nystrom, seed=0)

    def fit(self, la, loader):
        la.fit(loader)

    def moments(self, la, x):
        return la.functional_moments(x)

    def evidence(self, la, delta: float) -> float:
        return float(la.log_marginal_likelihood(torch.tensor(delta)))

    def tune(self, la) -> float:
        la.optimize_prior_precision(method="marglik", optimizer="lbfgs")
        return float(la.prior_precision)


def fix_cross_kernel(la) -> None:
    """Patch one laplace-torch 0.3 ``FunctionalLaplace`` instance: its ``_build_K_star_M``
    reshapes the cross-kernel blocks K[b, m, c, e] = J*(x_b)_c · J(x_m)_e (test output c,
    training output e) to (B, M·C, C) with the *test* output in the row index, where the
    solve against (κ K_MM + Λ⁻¹) needs the training output. The result is right only when
    K[b, m, c, e] is symmetric in (c, e) (one hidden layer); ``functional_agreement.py``
    shows it. Swapping the last two axes first gives its own definition to 1e-15."""
    build = la._build_K_star_M
    la._build_K_star_M = lambda blocks, joint=False: build(
        [k.transpose(-2, -1) if k.ndim == 4 else k for k in blocks], joint)


class LTFunctional:
    library = "laplace-torch"

    def __init__(self, m: int, indices: torch.Tensor | None = None, fixed: bool = False):
        self.m, self.indices, self.fixed = m, indices, fixed
        self.method = "FunctionalLaplace" + (" (marglik's subset)" if indices is not None else "")
        self.method += " (K*M fixed)" if fixed else ""
        self.subset = "marglik-random" if indices is not None else "SoDSampler"

    def build(self, model, delta: float):
        import laplace

        la = laplace.FunctionalLaplace(model, "classification", n_subset=self.m,
                                       prior_precision=delta)
        if self.indices is not None:  # the like-for-like check: marglik's M points, same order
            chosen = self.indices.tolist()
            la._get_SoD_data_loader = lambda loader: DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=chosen, shuffle=False)
        if self.fixed:
            fix_cross_kernel(la)
        return la

    def fit(self, la, loader):
        la.fit(loader)

    def moments(self, la, x):
        return la.predictive_moments(x)

    def evidence(self, la, delta: float) -> float:
        delta_t = torch.tensor([delta], dtype=la._dtype)
        return float(la.log_marginal_likelihood(prior_precision=delta_t))

    def tune(self, la) -> float:
        la.optimize_prior_precision(method="marglik")
        return float(la.prior_precision)


class LTElla:
    library = "laplace-torch"

    def __init__(self, m: int, balanced: bool):
        self.m, self.balanced = m, balanced
        self.method, self.subset = "ELLA", "balanced" if balanced else "random"

    def build(self, model, delta: float):
        import laplace

        return laplace.ELLA(model, "classification", subsample_size=self.m, n_eigenvalues=self.m,
                            prior_precision=delta, seed=0)

    def fit(self, la, loader):
        la.fit(loader, balanced=self.balanced)

    def moments(self, la, x):
        return la.predictive_moments(x)

    evidence = tune = None  # ELLA has neither (validation grid search only)


# ------------------------------------------------------------------------------- one row


def run_row(side, base, loader, xt, yt, delta: float, args, repeats: int) -> tuple[dict, object]:
    """Fit and predict ``repeats`` times on fresh deep copies; evidence, own δ on the last."""
    row = {"kind": "row", "library": side.library, "method": side.method, "M": side.m,
           "subset": getattr(side, "subset", None), "delta_star": _f(delta), "status": "ok"}
    fit_s, pred_s, la, probs = [], [], None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for _ in range(repeats):
                la = side.build(copy.deepcopy(base), delta)
                t, _ = timed(lambda la=la: side.fit(la, loader), args.time_limit)
                fit_s.append(t)
                t, probs = timed(lambda la=la: side.moments(la, xt), args.time_limit)
                pred_s.append(t)
                if fit_s[0] + pred_s[0] > args.slow:
                    break
            row.update({"fit_s": _f(statistics.median(fit_s)),
                        "predictive_s": _f(statistics.median(pred_s)),
                        "fit_all_s": [round(t, 4) for t in fit_s],
                        "predictive_all_s": [round(t, 4) for t in pred_s], **scores(probs, yt)})
        except StepTimeout:
            row["status"] = f"did not finish (time limit {args.time_limit} s)"
        except Exception as err:  # noqa: BLE001 - record what the library does
            row["status"] = f"failed: {type(err).__name__}: {err}"[:200]
        if side.evidence is not None and row["status"] == "ok":
            row.update(own_delta_part(side, la, xt, yt, delta, args))
    return row, (la if row["status"] == "ok" else None, probs)


def own_delta_part(side, la, xt, yt, delta: float, args) -> dict:
    """Evidence at δ*, then the library's own evidence-optimised δ and the scores there."""
    out = {"indices_head": None if getattr(la, "indices", None) is None
           else la.indices[:5].tolist()}
    try:
        t, ev = timed(lambda: side.evidence(la, delta), args.time_limit)
        out.update({"evidence_at_delta_star": _f(ev), "evidence_s": _f(t)})
        t, own = timed(lambda: side.tune(la), args.time_limit)
        out.update({"own_delta": _f(own), "tune_s": _f(t)})
        own_ev = side.evidence(la, own)
        own_scores = scores(side.moments(la, xt), yt)
        out.update({"evidence_at_own_delta": _f(own_ev),
                    **{f"{k}_own_delta": v for k, v in own_scores.items()}})
    except StepTimeout:
        out["own_delta_status"] = f"did not finish (time limit {args.time_limit} s)"
    except Exception as err:  # noqa: BLE001
        out["own_delta_status"] = f"failed: {type(err).__name__}: {err}"[:200]
    return out


def same_subset_line(base, loader, xt, yt, m: int, delta: float, n_data: int) -> dict:
    """marglik's and laplace-torch's subset posteriors on the same M points (marglik's random
    subset, seed 0): the predictive at δ*, and with marglik's prior scaled by N/M."""
    out = {"kind": "same_subset", "M": m, "delta_star": _f(delta)}
    ml = Marglik("subset", m)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours = ml.build(copy.deepcopy(base), delta)
            ml.fit(ours, loader)
            lt_side = LTFunctional(m, ours.indices)
            lt = lt_side.build(copy.deepcopy(base), delta)
            lt_side.fit(lt, loader)
            scaled = ml.build(copy.deepcopy(base), delta * n_data / m)
            ml.fit(scaled, loader)
            assert torch.equal(scaled.indices, ours.indices)
            (f_ml, v_ml), (f_sc, v_sc) = ours.functional_moments(xt), scaled.functional_moments(xt)
            f_lt, v_lt = lt.predictive_moments(xt)
            fix_cross_kernel(lt)
            v_fx = lt.predictive_moments(xt)[1]
            p_ml, p_lt, p_sc, p_fx = (plain_probit(f.double(), v.double()) for f, v in (
                (f_ml, v_ml), (f_lt, v_lt), (f_sc, v_sc), (f_lt, v_fx)))
            out.update({
                "max_abs_dprob_at_delta": _f((p_ml - p_lt).abs().max()),
                "rel_dcov_at_delta": _f(rel(v_ml, v_lt)),
                "max_abs_dprob_prior_scaled": _f((p_sc - p_lt).abs().max()),
                "rel_dcov_prior_scaled": _f(rel(v_sc, v_lt)),
                "max_abs_dprob_prior_scaled_vs_fixed": _f((p_sc - p_fx).abs().max()),
                "rel_dcov_prior_scaled_vs_fixed": _f(rel(v_sc, v_fx)),
                "nll_laplace_torch_fixed": metrics_of(p_fx, yt)["nll"],
                "max_abs_dmean": _f((f_ml.double() - f_lt.double()).abs().max()),
                "nll_marglik": metrics_of(p_ml, yt)["nll"],
                "nll_laplace_torch": metrics_of(p_lt, yt)["nll"],
                "nll_marglik_prior_scaled": metrics_of(p_sc, yt)["nll"],
                "evidence_marglik": _f(ml.evidence(ours, delta))})
            out["evidence_laplace_torch"] = _f(lt_side.evidence(lt, delta))
        except Exception as err:  # noqa: BLE001
            out["status"] = f"failed: {type(err).__name__}: {err}"[:200]
    return out


# ------------------------------------------------------------------------------- a model


def exact_row(base, loader, xt, yt, delta: float | None, args) -> dict:
    """marglik's exact posterior, one run: fit, δ* (L-BFGS on its evidence, unless given),
    evidence and predictive at δ*."""
    side = Marglik("exact", None)
    row = {"kind": "row", "library": "marglik", "method": "exact", "M": None, "subset": None,
           "status": "ok"}
    try:
        la = side.build(copy.deepcopy(base), delta or 1.0)
        t, _ = timed(lambda: side.fit(la, loader), args.time_limit)
        row["fit_s"] = _f(t)
        if delta is None:
            t, delta = timed(lambda: side.tune(la), args.time_limit)
            row["tune_s"] = _f(t)  # includes the one-off eigendecomposition
        t, ev = timed(lambda: side.evidence(la, delta), args.time_limit)
        row.update({"delta_star": _f(delta), "evidence_at_delta_star": _f(ev),
                    "evidence_s": _f(t)})
        t, probs = timed(lambda: side.moments(la, xt), args.time_limit)
        row.update({"predictive_s": _f(t), **scores(probs, yt)})
    except StepTimeout:
        row["status"] = f"did not finish (time limit {args.time_limit} s)"
    except Exception as err:  # noqa: BLE001
        row["status"] = f"failed: {type(err).__name__}: {err}"[:200]
    return row



def run_model(name: str, args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    x, y, xt, yt = load_digits_split(dtype=dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    t0 = time.perf_counter()
    base = vlt.train(name).to(dtype).eval()
    setup = {"kind": "setup", "model": name, "dtype": args.dtype,
             "params": sum(p.numel() for p in base.parameters()), "n_train": len(x),
             "n_test": len(xt), "train_s": round(time.perf_counter() - t0, 2)}
    with torch.no_grad():
        setup.update({f"map_{k}": v for k, v in metrics_of(base(xt).softmax(-1), yt).items()})
    emit(setup)
    delta = args.delta
    if not args.no_exact:
        row = exact_row(base, loader, xt, yt, delta, args)
        emit(row)
        delta = delta or row.get("delta_star")
    if delta is None:
        raise SystemExit("no δ: the exact row failed and --delta was not given")
    for m in args.sizes:
        ours = [Marglik("subset", m, "random"), Marglik("subset", m, "class"),
                Marglik("nystrom", m, "random", nystrom=True)] if "marglik" in args.rows else []
        theirs = ([LTFunctional(m), LTFunctional(m, fixed=True)]
                  if "lt-functional" in args.rows else []) + (
            [LTElla(m, False), LTElla(m, True)] if "ella" in args.rows else [])
        # alternate which library goes first with M, as the repetitions cannot interleave fits
        order = ours + theirs if args.sizes.index(m) % 2 == 0 else theirs + ours
        for side in order:
            emit(run_row(side, base, loader, xt, yt, delta, args, args.repeats)[0])
        if "same-subset" in args.rows:
            emit(same_subset_line(base, loader, xt, yt, m, delta, len(x)))
    return []


def table(paths: list[str]) -> None:
    """Markdown tables of saved output (rows, then same-subset lines)."""
    lines = [json.loads(ln) for path in paths for ln in open(path) if ln.startswith("{")]

    def cell(v, fmt="{:.3g}"):
        return "—" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    print("| dtype | library | method | M | subset | fit s | predictive s | NLL | ECE | "
          "NLL centred | ECE centred | acc | log Z(δ*) | own δ | log Z(own δ) | NLL (own δ) | "
          "NLL centred (own δ) | note |")
    print("|" + "---|" * 18)
    dtype = None
    for d in lines:
        if d["kind"] == "setup":
            dtype = d["dtype"]
            print(f"| {dtype} | MAP network | — | — | — | — | — | {d['map_nll']:.4f} | "
                  f"{d['map_ece']:.4f} | | | {d['map_acc']:.4f} | | | | | | |")
        if d["kind"] != "row":
            continue
        note = "; ".join(v for k, v in d.items() if k.endswith("status") and v != "ok")
        cells = [dtype, d["library"], d["method"], cell(d["M"]), cell(d["subset"]),
                 cell(d.get("fit_s")), cell(d.get("predictive_s"))]
        cells += [cell(d.get(k), "{:.4f}") for k in ("nll", "ece", "nll_centred",
                                                     "ece_centred", "acc")]
        cells += [cell(d.get("evidence_at_delta_star"), "{:.1f}"), cell(d.get("own_delta")),
                  cell(d.get("evidence_at_own_delta"), "{:.1f}")]
        cells += [cell(d.get(k), "{:.4f}") for k in ("nll_own_delta", "nll_centred_own_delta")]
        print("| " + " | ".join(cells) + f" | {note[:90]} |")
    print("\n| dtype | M | max abs Δp at δ* | rel Δcov at δ* | max abs Δp, prior ×N/M | "
          "rel Δcov, prior ×N/M | same, vs K*M fixed: max abs Δp | rel Δcov | NLL marglik | "
          "NLL marglik ×N/M | NLL laplace-torch | NLL laplace-torch, K*M fixed | "
          "log Z marglik | log Z laplace-torch |")
    print("|" + "---|" * 14)
    for d in lines:
        if d["kind"] == "setup":
            dtype = d["dtype"]
        if d["kind"] == "same_subset":
            keys = ("max_abs_dprob_at_delta", "rel_dcov_at_delta", "max_abs_dprob_prior_scaled",
                    "rel_dcov_prior_scaled", "max_abs_dprob_prior_scaled_vs_fixed",
                    "rel_dcov_prior_scaled_vs_fixed", "nll_marglik", "nll_marglik_prior_scaled",
                    "nll_laplace_torch", "nll_laplace_torch_fixed")
            cells = [dtype, str(d["M"])] + [cell(d.get(k)) for k in keys]
            cells += [cell(d.get(k), "{:.1f}") for k in ("evidence_marglik",
                                                           "evidence_laplace_torch")]
            print("| " + " | ".join(cells) + f" {d.get('status', '')[:60]} |")


def emit(line: dict) -> None:
    line["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(line), flush=True)


def environment() -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"kind": "environment", "python": platform.python_version(),
            "torch": torch.__version__, "laplace-torch": version("laplace-torch"),
            "curvlinops": version("curvlinops-for-pytorch"),
            "backpack": version("backpack-for-pytorch"), "marglik_commit": commit,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp32"], choices=["mlp32", "cnn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[50, 100, 200, 400])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--delta", type=float, default=None,
                        help="fixed δ for every row (default: the exact evidence optimum)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact row")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--slow", type=float, default=10.0,
                        help="a row whose first fit + predictive takes longer is not repeated")
    parser.add_argument("--time-limit", type=int, default=300)
    parser.add_argument("--table", nargs="+", metavar="FILE.jsonl",
                        help="print Markdown tables of saved output and exit")
    args = parser.parse_args(argv)
    if args.table:
        return table(args.table)
    torch.set_num_threads(1)
    emit(environment())
    start = time.perf_counter()
    for name in args.models:
        run_model(name, args)
    emit({"kind": "done", "total_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
