"""LOCI: cause–effect direction in location-scale noise models (Immer et al., ICML 2023).

Assume Y = f(X) + g(X) N with N ⊥ X (or the reverse). Standardise both variables, fit a Gaussian
p(effect | cause) in natural parameters in each direction
(:mod:`marglik.applications.causal.estimators`), then

- LOCI_M (``"loci-m"``): score = mean log p(y | x) − mean log p(x | y). Under an LSNM the causal
  conditional is the better fit.
- LOCI_H (``"loci-h"``): score = HSIC(y, r_x|y) − HSIC(x, r_y|x), with r the standardised residual
  (effect − μ(cause)) / σ(cause). In the causal direction the residual estimates N, independent of
  the cause, so its HSIC is the smaller one.

- LOCI_E (``"loci-e"``, docs/causal.md §2): score = [log Z(x) + log Z(y | x)] − [log Z(y) +
  log Z(x | y)] per point: the Laplace evidence of each factorisation of the standardised pair, the
  cause's marginal included (:mod:`~marglik.applications.causal.marginal`).

A positive score means x → y (ties, score = 0, also give x → y); the confidence is |score|.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from marglik.applications.causal.estimators import fit_jointly, make_estimator, standardise
from marglik.applications.causal.hsic import hsic
from marglik.applications.causal.marginal import marginal_log_evidence
from marglik.errors import MarglikError

METHODS = ("loci-h", "loci-m", "loci-e")
#: fewest points a pair may have
MIN_POINTS = 10


@dataclass(frozen=True)
class CausalResult:
    """The decision for one pair.

    Attributes:
        direction: ``"x->y"`` or ``"y->x"``.
        score: signed score of the method, positive means x → y.
        confidence: |score|, for ranking decisions (AUDRC).
        details: per-direction log-likelihoods (``"log_lik_x->y"``, ``"log_lik_y->x"``), HSIC values
            (``"hsic_x->y"``, ``"hsic_y->x"``, LOCI_H only), and ``"scores"``: the score of every
            method computed from these fits (LOCI_M always, LOCI_H when it was run).
    """

    direction: str
    score: float
    confidence: float
    details: dict = field(default_factory=dict)


def decide(score: float, details: dict | None = None) -> CausalResult:
    """CausalResult of a signed score (positive: x → y)."""
    direction = "x->y" if score >= 0 else "y->x"
    return CausalResult(direction, float(score), abs(float(score)), dict(details or {}))


def check_pair(
    x: Sequence[float], y: Sequence[float], names: tuple[str, str] = ("x", "y")
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x``, ``y`` as float64 1-D arrays; ``names`` are used in the error messages.

    Raises:
        MarglikError: (a ValueError) on non-numeric or non-1-D input, mismatched lengths, fewer
            than :data:`MIN_POINTS` points, NaN/inf values or a constant variable.
    """
    arrays = []
    for name, v in zip(names, (x, y), strict=True):
        try:
            v = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise MarglikError(f"{name} must be numeric: {err}") from None
        if v.ndim == 2 and 1 in v.shape:
            v = v.reshape(-1)
        if v.ndim != 1:
            raise MarglikError(f"{name} must be one-dimensional, got shape {v.shape}")
        arrays.append(v)
    x, y = arrays
    if len(x) != len(y):
        raise MarglikError(f"{names[0]} and {names[1]} have different lengths ({len(x)}, {len(y)})")
    if len(x) < MIN_POINTS:
        raise MarglikError(f"need at least {MIN_POINTS} points, got {len(x)}")
    for name, v in zip(names, (x, y), strict=True):
        bad = int((~np.isfinite(v)).sum())
        if bad:
            raise MarglikError(f"{name} contains {bad} NaN/inf values")
        if np.ptp(v) == 0:
            raise MarglikError(
                f"{name} is constant; a cause-effect direction needs two varying variables"
            )
    return x, y


def loci(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "loci-h",
    estimator: str = "spline",
    homoscedastic: bool = False,
    seed: int = 0,
    max_points: int = 2000,
    estimator_options: dict | None = None,
    max_fit_points: int | None = None,
    reference: bool = False,
    all_scores: bool = False,
) -> CausalResult:
    """Decide whether x causes y or y causes x from paired samples (n,) each.

    Args:
        method: ``"loci-h"`` (independence of the residuals, default), ``"loci-m"`` (likelihood)
            or ``"loci-e"`` (evidence of both factorisations, the cause's marginal included;
            needs a spline estimator, see :mod:`~marglik.applications.causal.marginal`).
        estimator: ``"spline"`` (convex, default), ``"nn"`` (neural network) or ``"spline-ev"``
            (spline with knots and ridge chosen by the Laplace evidence).
        homoscedastic: fit a single noise scale (an additive-noise model) instead of σ(cause).
        seed: seeds the neural network initialisation (not in reference mode, which uses the
            authors' 711) and the HSIC subsample.
        max_points: HSIC uses a seeded random subset above this many points.
        max_fit_points: if set, both estimators are fitted on one seeded random subset of this
            many points (pairs with more points only; the scores still use all points). None (the
            default) fits on all points.
        estimator_options: extra keyword arguments of the estimator class, e.g. ``{"steps": 500}``
            or ``{"evidence": True}`` (Laplace-evidence training, adds ``"evidence_x->y"`` and
            ``"evidence_y->x"`` to the details) for ``"nn"``; ``{"ridge": 1e-6}`` for ``"spline"``.
        reference: the authors' settings for both estimators and HSIC (docs/causal.md §1): the
            NN of :class:`~.estimators.ReferenceNeuralEstimator` (LOCI_M then uses −min training
            loss, as they do), the spline with ridge 1e-5/n and floor 1e-7, HSIC with
            ``bandwidth="loci"``.
        all_scores: compute every score the fits allow (``details["scores"]``), not only
            ``method``'s (HSIC for LOCI_H, the marginals' evidence for LOCI_E cost extra time).

    Raises:
        ValueError: on bad input (see :func:`check_pair`) or an unknown method / estimator.
    """
    return loci_many(
        [(x, y)],
        method=method,
        estimator=estimator,
        homoscedastic=homoscedastic,
        seed=seed,
        max_points=max_points,
        estimator_options=estimator_options,
        max_fit_points=max_fit_points,
        reference=reference,
        all_scores=all_scores,
    )[0]


def loci_many(
    pairs: Iterable[tuple[Sequence[float], Sequence[float]]],
    method: str = "loci-h",
    estimator: str = "spline",
    homoscedastic: bool = False,
    seed: int = 0,
    max_points: int = 2000,
    estimator_options: dict | None = None,
    max_fit_points: int | None = None,
    reference: bool = False,
    all_scores: bool = False,
) -> list[CausalResult]:
    """:func:`loci` on many (x, y) pairs in this process, both directions of all pairs fitted as
    one batch where the estimator allows it (the neural estimators: one batched model of
    2·len(pairs) networks; results equal one-pair fits, tested). Arguments as in :func:`loci`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if method == "loci-e" and estimator == "nn":
        raise ValueError("method 'loci-e' needs the evidence of a spline estimator")
    prepared, estimators, data = [], [], []
    for x, y in pairs:
        xs, ys = map(standardise, check_pair(x, y))
        fit = slice(None)
        if max_fit_points is not None and len(xs) > max_fit_points:
            fit = np.random.default_rng(seed).choice(len(xs), max_fit_points, replace=False)
            fit = np.sort(fit)
        options = dict(estimator_options or {})
        if reference and estimator == "spline":
            options.setdefault("ridge", 1e-5 / len(xs[fit]))  # δ = 1e-5 on the summed loss
        for _ in range(2):
            estimators.append(make_estimator(estimator, homoscedastic, seed, reference, **options))
        data += [(xs[fit], ys[fit]), (ys[fit], xs[fit])]
        prepared.append((xs, ys))
    fit_jointly(estimators, data)
    wanted = METHODS if all_scores else (method,)
    return [
        _decide_pair(
            xs, ys, *estimators[2 * i : 2 * i + 2], method, wanted, seed, max_points, reference
        )
        for i, (xs, ys) in enumerate(prepared)
    ]


def _decide_pair(
    xs, ys, forward, backward, method, wanted, seed, max_points, reference
) -> CausalResult:
    """Scores ``wanted`` of one standardised pair (n,) from its fitted estimators; the decision."""
    if reference and hasattr(forward, "min_loss_"):  # the authors' NN: −min training loss
        ll_xy, ll_yx = -forward.min_loss_, -backward.min_loss_
    else:
        ll_xy = float(forward.log_lik(xs, ys).mean())
        ll_yx = float(backward.log_lik(ys, xs).mean())
    details: dict = {
        "log_lik_x->y": ll_xy,
        "log_lik_y->x": ll_yx,
        "scores": {"loci-m": ll_xy - ll_yx},
    }
    for name, est in (("x->y", forward), ("y->x", backward)):
        if hasattr(est, "ridge_"):  # spline estimator: the ridge chosen by the evidence (or given)
            details[f"ridge_{name}"] = est.ridge_
        if hasattr(est, "n_knots_"):
            details[f"knots_{name}"] = est.n_knots_
    if hasattr(forward, "log_marglik_"):  # neural estimator with evidence=True: evidence per point
        details["evidence_x->y"] = forward.log_marglik_
        details["evidence_y->x"] = backward.log_marglik_
    if "loci-e" in wanted and hasattr(forward, "log_evidence_"):  # spline: both factorisations
        (marginal_x, k_x), (marginal_y, k_y) = map(marginal_log_evidence, (xs, ys))
        details.update({"components_x": k_x, "components_y": k_y})
        details["joint_evidence_x->y"] = marginal_x + forward.log_evidence_
        details["joint_evidence_y->x"] = marginal_y + backward.log_evidence_
        score = details["joint_evidence_x->y"] - details["joint_evidence_y->x"]
        details["scores"]["loci-e"] = score
    if "loci-h" in wanted:
        bandwidth = "loci" if reference else "median"
        options = {"max_points": max_points, "seed": seed, "bandwidth": bandwidth}
        h_xy = hsic(xs, forward.residuals(xs, ys), **options)
        h_yx = hsic(ys, backward.residuals(ys, xs), **options)
        details.update({"hsic_x->y": h_xy, "hsic_y->x": h_yx})
        details["scores"]["loci-h"] = h_yx - h_xy
    return decide(details["scores"][method], details)


def loci_batch(
    pairs: Iterable[tuple[Sequence[float], Sequence[float]]], n_jobs: int = 1, **kwargs
) -> list[CausalResult]:
    """:func:`loci` on many (x, y) pairs, in input order, over ``n_jobs`` worker processes.

    Workers are started with the ``spawn`` context (safe with torch) and run single-threaded
    (torch and, when ``threadpoolctl`` is installed, BLAS), which is fastest for these small fits.
    ``kwargs`` go to :func:`loci`. With ``n_jobs=1`` everything runs in this process, which is left
    as it is (its thread settings are not changed).
    """
    pairs = list(pairs)
    if n_jobs <= 1 or len(pairs) <= 1:
        return [loci(x, y, **kwargs) for x, y in pairs]
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(n_jobs, len(pairs)), initializer=single_threaded) as pool:
        return pool.starmap(_loci_star, [(x, y, kwargs) for x, y in pairs], chunksize=1)


def single_threaded() -> None:
    """Limit torch (and BLAS, via threadpoolctl if present) to one thread in this process."""
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return
    threadpool_limits(1)


def _loci_star(x, y, kwargs) -> CausalResult:
    return loci(x, y, **kwargs)
