"""A fitted LA-NAM on a table, as a model folder: training, save/load, predictions.

:func:`fit_additive_table` standardises a :class:`~marglik.data.Table` (features, and a
regression target) with training statistics, fits LA-NAM (:func:`fit_additive`, then
:func:`fit_interactions` for ``interactions > 0``; Bouchiat et al., AABI 2023) and returns an
:class:`AdditiveTableModel`. Its folder (``marglik fit --model additive``) holds

- ``config.json``: format ``marglik.additive/1``, ``"model": "additive"``, task, features,
  target, classes, widths, activation, pairs, likelihood, Hessian structure;
- ``model.pt`` (the :class:`AdditiveNet` state dict), ``laplace.pt`` (the posterior's
  :meth:`~marglik.posterior.Laplace.state_dict`), ``standardizer.pt`` (the standardisers);
- ``report.json`` (training summary, prior precisions, feature importances);

all loadable with ``torch.load(weights_only=True)`` / JSON. :meth:`AdditiveTableModel.predict`
gives the same :class:`~marglik.applications.tabular.TabularPrediction` as the MLP:
regression: mean f(x; θ*) and std sqrt(J Σ Jᵀ [+ σ²]) in the target's units (linearised
Laplace, Immer et al., AISTATS 2021); binary classification: the probit-approximated GLM
predictive p(y=1|x) = sigmoid(f / sqrt(1 + π/8 · J Σ Jᵀ)) and its complement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from marglik.applications.additive.fit import AdditiveFit, fit_additive, fit_interactions
from marglik.applications.additive.model import AdditiveNet
from marglik.applications.additive.shapes import ShapeFunctions, feature_grid, shape_functions
from marglik.applications.tabular.fit import BATCH_SIZE, FULL_BATCH_MAX, check_budget
from marglik.applications.tabular.model import TabularModel, read_model_folder
from marglik.data import Standardizer, Table
from marglik.errors import MarglikError
from marglik.posterior import Laplace

__all__ = ["ADDITIVE_FILES", "ADDITIVE_FORMAT", "AdditiveTableModel", "feature_importances",
           "fit_additive_table"]

#: format tag written to ``config.json``
ADDITIVE_FORMAT = "marglik.additive/1"
#: files an additive model folder holds (``shapes.png`` besides, when matplotlib is there)
ADDITIVE_FILES = ("model.pt", "laplace.pt", "standardizer.pt", "config.json", "report.json")


def feature_importances(feature_precisions: Tensor) -> Tensor:
    """Normalised prior variances of the feature subnetworks: (1/δ_d) / Σ_e (1/δ_e), (D,).

    The same definition as the estimators' ``feature_importances_``; a feature the evidence
    switched off has a large δ_d and an importance near 0.
    """
    variance = 1.0 / feature_precisions.detach().double()
    return variance / variance.sum()


class AdditiveTableModel(TabularModel):
    """A fitted LA-NAM with its standardisers and config: a :class:`TabularModel` (same
    attributes, predictive, state and folder files) whose ``laplace`` is the diagonal Laplace
    posterior over all weights of an :class:`AdditiveNet`, one prior precision per subnetwork
    and one for the bias; binary classes come from its single logit."""

    @property
    def model(self) -> AdditiveNet:
        return self.laplace.model

    def _class_probabilities(self, x: Tensor) -> Tensor:
        p1 = self.laplace(x, link_approx="probit").reshape(len(x), -1)[:, 0].detach()
        return torch.stack([1 - p1, p1], dim=1)

    def shapes(self, X: Tensor, n_points: int = 100) -> tuple[ShapeFunctions, float]:
        """Centred shape functions over the range of raw ``X`` (N, D), centred on X.

        Returns the :class:`ShapeFunctions` with ``grid`` in original feature units and
        ``mean``/``std`` (M, D, 1) in the model's output units (standardised target × its std,
        i.e. target units, for regression; logits for classification), and that output scale.
        """
        x = self._inputs(X)
        sf = shape_functions(self.laplace, self.model, x, grid=feature_grid(x, n_points))
        scale = 1.0 if self.y_scaler is None else self.y_scaler.std.reshape(()).item()
        grid = self.x_scaler.inverse_transform(sf.grid)
        return ShapeFunctions(grid, sf.mean * scale, sf.std * scale), scale

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AdditiveTableModel:
        """Rebuild from :meth:`state` (errors come from torch / the posterior)."""
        config = state["config"]
        model = AdditiveNet(len(config["features"]), tuple(config["hidden"]),
                            config["n_outputs"], [tuple(p) for p in config["pairs"]],
                            config["activation"])
        model.load_state_dict(state["model"])
        la = Laplace(model, config["likelihood"], subset_of_weights="all",
                     hessian_structure=config["hessian_structure"],
                     prior_groups=model.prior_groups())
        la.load_state_dict(state["laplace"])
        scalers = state["scalers"]
        y_scaler = Standardizer.from_state_dict(scalers["y"]) if "y" in scalers else None
        return cls(config, la, Standardizer.from_state_dict(scalers["x"]), y_scaler)

    @classmethod
    def load(cls, folder: str | Path) -> AdditiveTableModel:
        """Read a folder written by :meth:`save` (``marglik fit --model additive``)."""
        return read_model_folder(
            folder, ADDITIVE_FORMAT, "a marglik additive model folder (no valid config.json "
            "from 'marglik fit --model additive')", cls.from_state)


def fit_additive_table(
    table: Table,
    hidden: tuple[int, ...] = (32, 32),
    *,
    epochs: int = 300,
    evidence_every: int = 20,
    lr: float = 1e-2,
    interactions: int = 0,
    seed: int = 0,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
) -> tuple[AdditiveTableModel, dict[str, Any]]:
    """Standardise ``table`` and fit LA-NAM on it (Kronecker-factored Laplace per subnetwork and
    layer, :func:`~marglik.applications.additive.fit_additive`'s default; full batch up to
    :data:`~marglik.applications.tabular.FULL_BATCH_MAX` rows, else mini-batches of
    :data:`~marglik.applications.tabular.BATCH_SIZE`, as the MLP).

    Args:
        table: features (N, D) and target ((N,) class indices 0/1 or (N, 1) values).
        hidden: widths of every subnetwork.
        epochs, evidence_every, lr: the budget of each stage (burn-in ``evidence_every − 1``).
        interactions: k pair subnetworks added in stage 2 (0: none).
        seed: seeds the initialisation and the training.
        callback: ``callback(epoch, history)`` after every epoch; the epochs of stage 2 are
            numbered on from stage 1's (``epochs … 2·epochs − 1``).
        progress: show progress bars (stderr).

    Returns:
        the model and its report (the content of ``report.json``).

    Raises:
        MarglikError: bad widths, budget, learning rate or ``interactions``; more than two
            classes.
    """
    hidden = tuple(check_budget(hidden, epochs, evidence_every, lr))
    if isinstance(interactions, bool) or not isinstance(interactions, int) or interactions < 0:
        raise MarglikError(f"interactions must be an integer of at least 0, got {interactions!r}")
    if table.task == "classification" and len(table.classes) != 2:
        raise MarglikError(f"the additive model does binary classification only; target "
                           f"{table.target_name!r} has {len(table.classes)} classes")
    d = table.X.shape[1]
    if interactions > d * (d - 1) // 2:
        raise MarglikError(f"interactions must be at most {d * (d - 1) // 2} for {d} features, "
                           f"got {interactions}")
    x_scaler = Standardizer().fit(table.X.float())
    X = x_scaler.transform(table.X.float())
    if table.task == "classification":
        y_scaler, y, likelihood = None, table.y.float(), "binary"
    else:
        y_scaler = Standardizer().fit(table.y.float())
        y, likelihood = y_scaler.transform(table.y.float()), "regression"
    batch = None if len(X) <= FULL_BATCH_MAX else BATCH_SIZE  # as the MLP's training
    kw = dict(hidden=tuple(hidden), n_epochs=epochs, lr=lr, batch_size=batch,
              n_epochs_burnin=evidence_every - 1, marglik_frequency=evidence_every, seed=seed,
              callback=callback, progress=progress)
    fit: AdditiveFit = fit_additive(X, y, likelihood, **kw)
    if interactions > 0:
        stage2 = None if callback is None else (lambda e, h: callback(epochs + e, h))
        fit = fit_interactions(fit, X, y, interactions, seed=seed, callback=stage2,
                               progress=progress)
    la = fit.la
    config = {
        "format": ADDITIVE_FORMAT, "model": "additive", "task": table.task,
        "target": table.target_name, "features": table.feature_names, "classes": table.classes,
        "hidden": list(hidden), "activation": fit.model.activation, "n_outputs": 1,
        "pairs": [list(p) for p in fit.model.pairs],
        "likelihood": likelihood, "subset_of_weights": "all",
        "hessian_structure": la.hessian_structure,
    }
    importances = feature_importances(fit.feature_precisions)
    report: dict[str, Any] = {
        "n_train": len(X), "n_features": d, "task": table.task,
        "log_marglik": la.log_marginal_likelihood().item(),
        "prior_precision_features": fit.feature_precisions.tolist(),
        "prior_precision_pairs": fit.pair_precisions.tolist(),
        "feature_importances": dict(zip(table.feature_names, importances.tolist())),
        "pairs": [[table.feature_names[i], table.feature_names[j]] for i, j in fit.model.pairs],
        "seconds": round(fit.seconds + fit.options.get("stage1_seconds", 0.0), 2),
        "training": {"epochs": epochs, "evidence_every": evidence_every,
                     "interactions": interactions, "batch_size": batch or len(X)},
    }
    if y_scaler is not None:
        sigma = la.sigma_noise.reshape(()).item()
        report["sigma_noise_original_units"] = sigma * y_scaler.std.reshape(()).item()
    if not all(math.isfinite(v) for v in importances.tolist()):
        raise MarglikError("the fit gave non-finite prior precisions; try fewer epochs or "
                           "a smaller --lr")
    return AdditiveTableModel(config, la, x_scaler, y_scaler), report
