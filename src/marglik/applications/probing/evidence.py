"""Evidence-based probing (Immer, Torroba Hennigen, Fortuin & Cotterell, ACL 2022).

A representation r is scored for a task by the evidence of its best probe family,

    log p(y | r) ≈ max_F max_δ log Z_F(δ),
    log Z_F(δ) = log p(y | r, θ*) − ½ θ*ᵀ diag(δ) θ* − ½ [log det(H + diag(δ)) − log det diag(δ)],

the Laplace evidence (MacKay 1992; Immer et al., ICML 2021) of probe family F (architecture,
posterior structure of the GGN H, prior structure of δ) at its mode θ*, with θ* and δ found
jointly by online evidence maximisation (:func:`marglik.marglik_training`). Unlike held-out
accuracy, the evidence charges an expressive probe for its complexity, so a random
representation cannot "win" through a probe that memorises, and random labels should score
near log p(y) of the class frequencies (families with a per-parameter prior and P ≫ N can
over-fit the evidence and exceed it: ``docs/probing.md``).

The families are trained one after another, not stacked into one batched network: each has its
own architecture, curvature structure and prior structure, and :func:`marglik.marglik_training`
keeps the state with the best evidence of the model it trains, so stacked probes would share
one "best epoch" (the best sum) and each would get a different answer than when trained alone.
Stacking would mainly save per-batch overhead on small probes (not measured; see
``docs/probing.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from marglik.applications.probing.families import ProbeFamily, build_probe, resolve_probes
from marglik.applications.probing.inputs import encode_labels, probe_inputs
from marglik.data import Standardizer
from marglik.posterior import Laplace
from marglik.training import marglik_training

__all__ = ["ProbeResult", "probe_evidence"]

#: default mini-batch size (data sets up to this many rows are one full batch)
BATCH_SIZE = 128


@dataclass
class ProbeResult:
    """What :func:`probe_evidence` found, per probe family (keyed by family name).

    Attributes:
        log_evidence: converged log marginal likelihood log Z (nats, summed over the data).
        families: the :class:`ProbeFamily` of each name.
        probes: the trained probe networks (inputs: standardised rows, see :meth:`transform`).
        posteriors: the fitted :class:`marglik.Laplace` at each probe's best-evidence state.
        histories: :func:`marglik.marglik_training` histories.
        seconds: wall time of each family's training.
        classes: the label values, class id c ↔ ``classes[c]``.
        n_data: number of labelled rows M.
        standardizer: the feature standardiser (None with ``standardize=False``).
    """

    log_evidence: dict[str, float]
    families: dict[str, ProbeFamily]
    probes: dict[str, nn.Module]
    posteriors: dict[str, Laplace]
    histories: dict[str, dict]
    seconds: dict[str, float]
    classes: list
    n_data: int
    standardizer: Standardizer | None = field(default=None)

    @property
    def best(self) -> str:
        """Name of the family with the highest evidence (the first of ties)."""
        return max(self.log_evidence, key=self.log_evidence.__getitem__)

    @property
    def best_log_evidence(self) -> float:
        """log Z of the best family: the representation's score."""
        return self.log_evidence[self.best]

    def per_datum(self) -> dict[str, float]:
        """log Z / M per family (nats per labelled row)."""
        return {k: v / self.n_data for k, v in self.log_evidence.items()}

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per family (name, architecture, structure, prior, log Z, log Z / M,
        seconds), in training order: ready for JSON or a table."""
        return [
            {"family": name, "architecture": f.architecture,
             "hessian_structure": f.hessian_structure, "prior_structure": f.prior_structure,
             "log_evidence": self.log_evidence[name],
             "log_evidence_per_datum": self.log_evidence[name] / self.n_data,
             "seconds": self.seconds[name]}
            for name, f in self.families.items()
        ]

    def transform(self, X: Tensor) -> Tensor:
        """Rows (M, D') as the probes see them (standardised with the training statistics)."""
        return X if self.standardizer is None else self.standardizer.transform(X)

    def predict_proba(self, X: Tensor, family: str | None = None) -> Tensor:
        """Class probabilities (M, C) of ``family``'s probe (default: the best) at its mode, for
        rows X (M, D') formed like the training rows (tensor or array)."""
        name = self.best if family is None else family
        if name not in self.probes:
            raise ValueError(f"no probe family {name!r} in this result: {list(self.probes)}")
        probe = self.probes[name]
        X = torch.as_tensor(X, dtype=next(probe.parameters()).dtype)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (M, {self.n_features}) like the probe rows, got "
                             f"{tuple(X.shape)}")
        with torch.no_grad():
            return torch.softmax(probe(self.transform(X)), dim=-1)

    @property
    def n_features(self) -> int:
        """D', the width of the probe rows."""
        first = next(iter(self.probes.values()))
        return next(first.parameters()).shape[1]


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _loader(X: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterable:
    """One full batch, or shuffled mini-batches from a generator seeded with ``seed``."""
    if batch_size >= len(X):
        return [(X, y)]
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                       batch_size=batch_size, shuffle=True, generator=generator)


def probe_evidence(
    features: Any,
    labels: Any,
    probes: str | ProbeFamily | Iterable[str | ProbeFamily] = "all",
    *,
    level: str = "sentence",
    pairs: Any = None,
    mask: Any = None,
    ignore_index: int = -100,
    pair_combine: str = "concat",
    width: int = 128,
    n_epochs: int = 100,
    batch_size: int | None = None,
    lr: float = 1e-2,
    lr_hyp: float = 0.1,
    n_hypersteps: int = 50,
    marglik_frequency: int = 5,
    n_epochs_burnin: int = 0,
    prior_prec_init: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
    progress: bool = False,
    training_kwargs: dict[str, Any] | None = None,
) -> ProbeResult:
    """Evidence of each probe family on frozen ``features`` for ``labels`` (ACL 2022).

    Every family is trained by online evidence maximisation
    (:func:`marglik.marglik_training`, Immer et al. ICML 2021, Algorithm 1) on the same rows,
    from the same seed, and scored by its converged Laplace evidence log Z (module docstring).
    Compare representations of the same labelled items by ``result.best_log_evidence``.

    Args:
        features: representations, (N, D) or token features (N, L, D); tensor or numpy array,
            floating point (the probes use its dtype).
        labels: integer or string labels: (N,) sentence level, (N, L) token level, (M,) pairs.
        probes: ``"all"`` (the 9 built-in families), family names, architectures (``"mlp1"``) or
            :class:`ProbeFamily` objects (:mod:`~marglik.applications.probing.families`).
        level, pairs, mask, ignore_index, pair_combine: how rows and labels are formed
            (:func:`~marglik.applications.probing.inputs.probe_inputs`).
        width: hidden units of the MLP probes (unless a family sets its own).
        n_epochs, batch_size, lr: θ's Adam training (default batches of ``BATCH_SIZE`` = 128
            rows, shuffled; one full batch for fewer rows).
        lr_hyp, n_hypersteps, marglik_frequency, n_epochs_burnin, prior_prec_init: the
            evidence updates of :func:`marglik.marglik_training`.
        standardize: standardise each feature column by its mean and standard deviation over
            the rows (a fixed, invertible map of the representation; constant columns are only
            centred) so that one prior precision per layer fits all columns.
        seed: seeds each family's initialisation and batch order (the global RNG state is
            restored afterwards), so equal seeds give equal results.
        progress: a progress bar per family.
        training_kwargs: further :func:`marglik.marglik_training` arguments (e.g.
            ``laplace_kwargs={"kfac_approx": "reduce"}``).

    Returns:
        A :class:`ProbeResult`: log Z per family, the best, the trained probes and posteriors.

    Raises:
        ValueError / TypeError: for bad features, labels, pairs, probes or settings, naming
            the problem.
    """
    families = resolve_probes(probes)
    X, raw_labels = probe_inputs(features, labels, level, pairs=pairs, mask=mask,
                                 ignore_index=ignore_index, pair_combine=pair_combine)
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"need at least 2 labelled rows with at least one feature, got rows of "
                         f"shape {tuple(X.shape)}")
    classes, y = encode_labels(raw_labels)
    for name, value in (("width", width), ("n_epochs", n_epochs),
                        ("marglik_frequency", marglik_frequency)):
        _check_positive_int(name, value)
    _check_positive_int("batch_size", batch_size, allow_none=True)
    for name, value in (("lr", lr), ("lr_hyp", lr_hyp), ("prior_prec_init", prior_prec_init)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    kwargs = dict(training_kwargs or {})
    clash = {"model", "train_loader", "likelihood", "hessian_structure", "prior_structure",
             "n_epochs", "lr", "lr_hyp", "n_hypersteps", "marglik_frequency", "n_epochs_burnin",
             "prior_prec_init", "progress"} & set(kwargs)
    if clash:
        raise ValueError(f"give {sorted(clash)} as probe_evidence arguments, not in "
                         "training_kwargs")

    standardizer = Standardizer().fit(X) if standardize else None
    X = X if standardizer is None else standardizer.transform(X)
    if batch_size is None:
        batch_size = BATCH_SIZE

    log_evidence: dict[str, float] = {}
    out: dict[str, dict] = {"probes": {}, "posteriors": {}, "histories": {}, "seconds": {}}
    for family in families:
        tic = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_probe(family, X.shape[1], len(classes), width).to(X.dtype)
            la, model, history = marglik_training(
                model, _loader(X, y, batch_size, seed), "classification",
                hessian_structure=family.hessian_structure,
                prior_structure=family.prior_structure, n_epochs=n_epochs, lr=lr,
                lr_hyp=lr_hyp, n_hypersteps=n_hypersteps, marglik_frequency=marglik_frequency,
                n_epochs_burnin=n_epochs_burnin, prior_prec_init=prior_prec_init,
                progress=progress, **kwargs)
        log_evidence[family.name] = la.log_marginal_likelihood().item()
        out["probes"][family.name], out["posteriors"][family.name] = model, la
        out["histories"][family.name] = history
        out["seconds"][family.name] = time.perf_counter() - tic
    return ProbeResult(log_evidence, {f.name: f for f in families}, out["probes"],
                       out["posteriors"], out["histories"], out["seconds"], classes, len(X),
                       standardizer)
