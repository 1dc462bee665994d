"""Training the tabular model: online evidence maximisation of a tanh MLP on a table.

:func:`fit_table` standardises the features (and a regression target), trains the network with
:func:`marglik.training.marglik_training` (all-weights KFAC Laplace, layer-wise prior precision,
noise tuned for regression) and returns the
:class:`~marglik.applications.tabular.model.TabularModel` and a report (the content of
``report.json``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from marglik import metrics
from marglik.applications.tabular.model import (
    FORMAT,
    TabularModel,
    build_network,
    class_probabilities,
)
from marglik.data import Standardizer, Table
from marglik.errors import MarglikError
from marglik.training import marglik_training

__all__ = [
    "BATCH_SIZE",
    "FULL_BATCH_MAX",
    "check_budget",
    "check_table",
    "default_budget",
    "fit_table",
    "train_table",
]

#: tables larger than this are trained in mini-batches
FULL_BATCH_MAX = 2048
#: mini-batch size for tables larger than :data:`FULL_BATCH_MAX`
BATCH_SIZE = 128


def _batches(X: Tensor, y: Tensor, seed: int) -> Any:
    """One full batch for tables up to FULL_BATCH_MAX rows, else shuffled mini-batches."""
    if len(X) <= FULL_BATCH_MAX:
        return [(X, y)]
    data = torch.utils.data.TensorDataset(X, y)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE, shuffle=True, generator=g)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _initial_network(n_in: int, hidden: Sequence[int], n_out: int, dtype: torch.dtype) -> Any:
    """The network with its initial weights drawn in float32 and cast to ``dtype``, so that a
    seed gives the same weights whatever the dtype."""
    with default_dtype(torch.float32):
        model = build_network(n_in, hidden, n_out)
    return model.to(dtype)


def check_table(table: Table, source: str | None = None) -> None:
    """:class:`MarglikError` if ``table`` cannot be trained on: a single class, or no features.

    ``source`` (a file name) is named in the message.
    """
    if table.task == "classification" and len(table.classes) < 2:
        raise MarglikError(
            f"target {table.target_name!r} has a single class {table.classes[0]!r}: "
            "nothing to classify"
        )
    if table.X.shape[1] == 0:
        where = repr(source) if source is not None else "the table"
        raise MarglikError(
            f"{where} has no feature columns besides the target {table.target_name!r}"
        )


def check_budget(
    hidden: Sequence[int], epochs: int | None, evidence_every: int | None, lr: float
) -> list[int]:
    """The hidden widths as ints; :class:`MarglikError` for bad widths, budgets or learning rate.

    Shared by :func:`train_table`, the scikit-learn estimators and the command line, so that
    every entry point rejects the same values with the same message.
    """
    try:
        widths = [int(h) for h in hidden]
    except (TypeError, ValueError):
        widths = []
    if not widths or any(h < 1 for h in widths) or any(
        isinstance(h, float) and not float(h).is_integer() for h in hidden
    ):
        raise MarglikError(f"hidden widths must be positive integers, got {list(hidden)!r}")
    for name, value in (("epochs", epochs), ("evidence_every", evidence_every)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise MarglikError(f"{name} must be an integer of at least 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
        math.isfinite(lr) and lr > 0
    ):
        raise MarglikError(f"lr must be a finite number > 0, got {lr!r}")
    return widths


def default_budget(
    n_rows: int, epochs: int | None, evidence_every: int | None
) -> tuple[int, int, bool]:
    """``(epochs, evidence_every, full_batch)``: the training budget :func:`train_table` uses.

    Tables up to :data:`FULL_BATCH_MAX` rows are trained full-batch for 1000 epochs, larger
    ones in mini-batches of :data:`BATCH_SIZE` for 100 epochs; ``evidence_every`` defaults to
    ``epochs // 20`` (at least 1).
    """
    full_batch = n_rows <= FULL_BATCH_MAX
    epochs = int(epochs) if epochs is not None else (1000 if full_batch else 100)
    every = int(evidence_every) if evidence_every is not None else max(1, epochs // 20)
    return epochs, every, full_batch


def train_table(
    table: Table,
    hidden: Sequence[int] = (50,),
    *,
    epochs: int | None = None,
    evidence_every: int | None = None,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[TabularModel, dict[str, Any]]:
    """Standardise ``table`` and train the MLP by online evidence maximisation.

    The training recipe shared by :func:`fit_table` (the command line) and the scikit-learn
    estimators (:mod:`marglik.applications.tabular.estimators`). The global torch random state
    is left as it was (the seed acts inside :func:`torch.random.fork_rng`).

    Args:
        table: features ``X`` (N, D) and target ``y`` ((N,) class indices or (N, 1) values).
        hidden, epochs, evidence_every, lr, seed, progress, source: as in :func:`fit_table`.
        callback: called as ``callback(epoch, history)`` after every epoch (0-based epoch;
            ``history`` is :func:`marglik.marglik_training`'s), e.g. to print progress lines.
        dtype: floating dtype of the network and the data (``torch.float32`` or
            ``torch.float64``; stored in the config as ``"dtype"``).

    Returns:
        The model and the training summary (the ``"training"`` entry of ``report.json``:
        epochs, evidence_every, full_batch, best_epoch, evidence_epochs, log_marglik, loss,
        seconds).
    """
    hidden = check_budget(hidden, epochs, evidence_every, lr)
    check_table(table, source)
    classification = table.task == "classification"
    epochs, every, full_batch = default_budget(len(table.X), epochs, evidence_every)

    if dtype not in (torch.float32, torch.float64):
        raise MarglikError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    # the caller's default dtype would change the hyperparameters' dtype: training runs in dtype
    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        torch.manual_seed(seed)
        x_scaler = Standardizer().fit(table.X.to(dtype))
        X = x_scaler.transform(table.X.to(dtype))
        y_scaler = None
        if classification:
            y, n_out, likelihood = table.y, len(table.classes), "classification"
        else:
            y_scaler = Standardizer().fit(table.y.to(dtype))
            y, n_out, likelihood = y_scaler.transform(table.y.to(dtype)), 1, "regression"
        model = _initial_network(X.shape[1], hidden, n_out, dtype)
        batches = _batches(X, y, seed)
        start = time.perf_counter()
        la, _, history = marglik_training(
            model,
            batches,
            likelihood,
            hessian_structure="kron",
            prior_structure="layerwise",
            n_epochs=epochs,
            lr=lr,
            n_epochs_burnin=every - 1,
            marglik_frequency=every,
            n_hypersteps=50,
            progress=progress,
            callback=None if callback is None else (lambda e, m, la, h: callback(e, h)),
        )
        seconds = time.perf_counter() - start
    evaluated = [(e, v) for e, v in enumerate(history["log_marglik"]) if not math.isnan(v)]
    best_epoch = max(evaluated, key=lambda ev: ev[1])[0] if evaluated else epochs - 1

    config = {
        "format": FORMAT,
        "task": table.task,
        "target": table.target_name,
        "features": table.feature_names,
        "classes": table.classes,
        "hidden": hidden,
        "activation": "tanh",
        "n_outputs": n_out,
        "likelihood": likelihood,
        "subset_of_weights": "all",
        "hessian_structure": "kron",
    }
    if dtype != torch.float32:
        config["dtype"] = str(dtype).removeprefix("torch.")
    training = {
        "epochs": epochs,
        "evidence_every": every,
        "full_batch": full_batch,
        "best_epoch": best_epoch + 1,
        "evidence_epochs": [e + 1 for e, _ in evaluated],
        "log_marglik": [v for _, v in evaluated],
        "loss": history["loss"],
        "seconds": round(seconds, 2),
    }
    return TabularModel(config, la, x_scaler, y_scaler), training


def fit_table(
    table: Table,
    hidden: Sequence[int] = (50,),
    *,
    epochs: int | None = None,
    evidence_every: int | None = None,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    source: str | None = None,
) -> tuple[TabularModel, dict[str, Any]]:
    """Train the MLP on ``table`` by online evidence maximisation (:func:`train_table`) and
    write its report.

    Args:
        table: features and target, e.g. from :func:`marglik.data.read_table`.
        hidden: widths of the hidden layers.
        epochs: training epochs; default 1000 for tables up to :data:`FULL_BATCH_MAX` rows
            (trained full-batch), 100 for larger ones (mini-batches of :data:`BATCH_SIZE`).
        evidence_every: epochs between evidence updates of the hyperparameters; default
            ``epochs // 20`` (at least 1).
        lr: Adam learning rate.
        seed: seed of the initial weights and the mini-batch order.
        progress: show progress bars (on stderr).
        callback: called as ``callback(epoch, history)`` after every epoch.
        source: where the table came from (a file name), for messages and the report.

    Returns:
        The model and its report (the content of ``report.json``: training metrics, log
        evidence, hyperparameters, training history, seconds).

    Raises:
        MarglikError: a single class, no feature columns (:func:`check_table`), or bad widths,
            budgets or learning rate (:func:`check_budget`).
    """
    fitted, training = train_table(
        table, hidden, epochs=epochs, evidence_every=evidence_every, lr=lr, seed=seed,
        progress=progress, callback=callback, source=source,
    )
    la = fitted.laplace
    X = fitted.x_scaler.transform(table.X)
    y = table.y if fitted.y_scaler is None else fitted.y_scaler.transform(table.y)
    hyper: dict[str, Any] = {
        "prior_precision": la.prior_precision.tolist(),
        "prior_precision_layers": la.subset.names,
    }
    if fitted.y_scaler is not None:
        sigma = la.sigma_noise.reshape(()).item()
        hyper["sigma_noise"] = sigma
        hyper["sigma_noise_original_units"] = sigma * fitted.y_scaler.std.reshape(()).item()
    seconds = training.pop("seconds")
    report = {
        "data": source,
        "n_train": len(X),
        "n_features": X.shape[1],
        "task": table.task,
        "classes": table.classes,
        "hidden": fitted.config["hidden"],
        "log_marglik": la.log_marginal_likelihood().item(),
        "hyperparameters": hyper,
        "train_metrics": _train_metrics(fitted, X, y),
        "training": training,
        "seconds": seconds,
    }
    return fitted, report


def _train_metrics(fitted: TabularModel, X: Tensor, y: Tensor) -> dict[str, float]:
    """Metrics on the (standardised) training data; RMSE and NLL in the target's units."""
    la = fitted.laplace
    with torch.no_grad():
        f = la.model(X)
    if fitted.task == "classification":
        probs = class_probabilities(la, X)
        return {
            "accuracy": metrics.accuracy(probs, y).item(),
            "nll": metrics.nll(probs, y).item(),
            "ece": metrics.ece(probs, y).item(),
            "map_nll": metrics.nll(torch.softmax(f, -1), y).item(),
        }
    f_mean, f_var = la(X)
    var = f_var.reshape(len(X), -1)[:, :1] + la.sigma_noise.reshape(()) ** 2
    scale = fitted.y_scaler.std.reshape(()).item()
    return {
        "rmse": metrics.rmse(f_mean.reshape(-1, 1), y).item() * scale,
        "nll": metrics.gaussian_nll(f_mean.reshape(-1, 1), var, y).item() + math.log(scale),
    }
