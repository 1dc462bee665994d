"""``marglik fit`` and ``marglik predict``: a hyperparameter-free Bayesian MLP for CSV tables.

``fit`` standardises the inputs (and, for regression, the target), then trains the MLP by online
evidence maximisation (:func:`marglik.online.marglik_training`, Immer et al., ICML 2021,
Algorithm 1): Adam on the MAP objective with the current layer-wise prior precision δ (and noise
σ); every ``--evidence-every`` epochs an all-weights KFAC Laplace posterior is fitted and δ (and σ)
take 50 Adam steps on its log marginal likelihood; the state with the highest evidence is kept.
Nothing is set by hand but the architecture and the training budget.

A model folder holds (all loadable with ``torch.load(..., weights_only=True)``):

- ``config.json`` — format tag, task, feature and target names, classes, architecture;
- ``model.pt`` — the network's ``state_dict``;
- ``laplace.pt`` — :meth:`marglik.Laplace.state_dict` (posterior and tuned hyperparameters);
- ``standardizer.pt`` — ``{"x": ..., "y": ...}`` (``"y"`` for regression only), each the
  state of a :class:`marglik.data.Standardizer`;
- ``report.json`` — training metrics, log evidence and hyperparameters per round.

Predictions use the GLM (linearised) predictive: class probabilities by the probit link, regression
means and variances in closed form; ``docs/calibration.md`` has the measurements behind these
choices.

``predict`` reads the folder and a CSV with the same feature columns (any other columns, e.g. the
target, are ignored) and writes, per row, regression: ``mean``, ``std_with_noise``,
``std_without_noise`` in the target's original units; classification: ``p_<class>`` per class and
the predicted ``label``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marglik.cli import CLIError

FORMAT = "marglik.tabular/1"
#: tables larger than this are trained in mini-batches
FULL_BATCH_MAX = 2048
BATCH_SIZE = 128


# ---- the model --------------------------------------------------------------------------------
def build_mlp(n_in: int, hidden: list[int], n_out: int) -> nn.Sequential:
    """An MLP ``n_in → hidden[0] → … → n_out`` with tanh activations."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def parse_hidden(text: str) -> list[int]:
    """``"50"`` or ``"50,50"`` → widths of the hidden layers."""
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise CLIError(f"--hidden must be positive integers separated by commas, got {text!r}")
    return widths


def loader(X: Tensor, y: Tensor, seed: int) -> Any:
    """One full batch for tables up to FULL_BATCH_MAX rows, else shuffled mini-batches."""
    if len(X) <= FULL_BATCH_MAX:
        return [(X, y)]
    data = torch.utils.data.TensorDataset(X, y)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE, shuffle=True, generator=g)


def class_probabilities(la: Any, X: Tensor) -> Tensor:
    """GLM predictive with the probit link (deterministic): (N, C)."""
    return la(X, pred_type="glm", link_approx="probit")


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal (they go to stderr)."""
    return sys.stderr.isatty()


# ---- fit --------------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    from marglik import metrics
    from marglik.data import DataError, Standardizer, read_table
    from marglik.online import marglik_training

    hidden = parse_hidden(args.hidden)
    for name in ("epochs", "evidence_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be at least 1, got {value}")
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        table = read_table(args.data, args.target, task=args.task)
    except DataError as err:
        raise CLIError(str(err)) from None
    classification = table.task == "classification"
    if classification and len(table.classes) < 2:
        raise CLIError(
            f"target {args.target!r} has a single class {table.classes[0]!r}: nothing to classify"
        )
    if table.X.shape[1] == 0:
        raise CLIError(f"{args.data!r} has no feature columns besides the target {args.target!r}")

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {str(out)!r}: {err.strerror}") from None

    torch.manual_seed(args.seed)
    x_scaler = Standardizer().fit(table.X)
    X = x_scaler.transform(table.X)
    y_scaler = None
    if classification:
        y, n_out, likelihood = table.y, len(table.classes), "classification"
    else:
        y_scaler = Standardizer().fit(table.y)
        y, n_out, likelihood = y_scaler.transform(table.y), 1, "regression"
    model = build_mlp(X.shape[1], hidden, n_out)
    batches = loader(X, y, args.seed)
    full_batch = isinstance(batches, list)
    epochs = args.epochs if args.epochs is not None else (1000 if full_batch else 100)
    every = args.evidence_every if args.evidence_every is not None else max(1, epochs // 20)

    start = time.perf_counter()
    la, model, history = marglik_training(
        model,
        batches,
        likelihood,
        hessian_structure="kron",
        prior_structure="layerwise",
        n_epochs=epochs,
        lr=args.lr,
        n_epochs_burnin=every - 1,
        marglik_frequency=every,
        n_hypersteps=50,
        progress=progress_enabled(),
    )
    seconds = time.perf_counter() - start
    evaluated = [(e, v) for e, v in enumerate(history["log_marglik"]) if not math.isnan(v)]
    best_epoch = max(evaluated, key=lambda ev: ev[1])[0] if evaluated else epochs - 1

    with torch.no_grad():
        f = model(X)
    train: dict[str, float] = {}
    if classification:
        probs = class_probabilities(la, X)
        train = {
            "accuracy": metrics.accuracy(probs, y).item(),
            "nll": metrics.nll(probs, y).item(),
            "ece": metrics.ece(probs, y).item(),
            "map_nll": metrics.nll(torch.softmax(f, -1), y).item(),
        }
    else:
        f_mean, f_var = la(X)
        var = f_var.reshape(len(X), -1)[:, :1] + la.sigma_noise.reshape(()) ** 2
        scale = y_scaler.std.reshape(()).item()
        train = {
            "rmse": metrics.rmse(f_mean.reshape(-1, 1), y).item() * scale,
            "nll": metrics.gaussian_nll(f_mean.reshape(-1, 1), var, y).item() + math.log(scale),
        }

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
    hyper = {
        "prior_precision": la.prior_precision.tolist(),
        "prior_precision_layers": la.subset.names,
    }
    if not classification:
        sigma = la.sigma_noise.reshape(()).item()
        hyper["sigma_noise"] = sigma
        hyper["sigma_noise_original_units"] = sigma * y_scaler.std.reshape(()).item()
    report = {
        "data": str(args.data),
        "n_train": len(X),
        "n_features": X.shape[1],
        "task": table.task,
        "classes": table.classes,
        "hidden": hidden,
        "log_marglik": la.log_marginal_likelihood().item(),
        "hyperparameters": hyper,
        "train_metrics": train,
        "training": {
            "epochs": epochs,
            "evidence_every": every,
            "full_batch": full_batch,
            "best_epoch": best_epoch + 1,
            "evidence_epochs": [e + 1 for e, _ in evaluated],
            "log_marglik": [v for _, v in evaluated],
            "loss": history["loss"],
        },
        "seconds": round(seconds, 2),
    }
    scalers = {"x": x_scaler.state_dict()}
    if y_scaler is not None:
        scalers["y"] = y_scaler.state_dict()
    torch.save(model.state_dict(), out / "model.pt")
    torch.save(la.state_dict(), out / "laplace.pt")
    torch.save(scalers, out / "standardizer.pt")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"marglik fit: {table.task} on {len(X)} rows x {X.shape[1]} features, MLP "
        f"{X.shape[1]}-{'-'.join(map(str, hidden))}-{n_out}, {epochs} epochs "
        f"(evidence every {every}) in {seconds:.1f} s"
    )
    print(f"  log evidence (best, epoch {best_epoch + 1}): {report['log_marglik']:.2f}")
    deltas = ", ".join(f"{n}={v:.3g}" for n, v in zip(la.subset.names, la.prior_precision.tolist()))
    print(f"  prior precision: {deltas}")
    if not classification:
        print(f"  noise sigma: {hyper['sigma_noise_original_units']:.4g} (original units)")
    print("  train: " + ", ".join(f"{k} {v:.4f}" for k, v in train.items()))
    print(f"  saved to {out}/ (model.pt, laplace.pt, standardizer.pt, config.json, report.json)")
    return 0


# ---- predict ----------------------------------------------------------------------------------
def load_model_dir(path: str) -> tuple[dict, Any, Any, Any]:
    """(config, laplace, x_scaler, y_scaler or None) from a folder written by ``marglik fit``."""
    from marglik import Laplace
    from marglik.data import Standardizer

    folder = Path(path)
    if not folder.is_dir():
        raise CLIError(f"model folder {path!r} does not exist or is not a folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CLIError(
            f"{path!r} is not a marglik model folder (no valid config.json from 'marglik fit')"
        )
    try:
        model = build_mlp(len(config["features"]), config["hidden"], config["n_outputs"])
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        scalers = torch.load(folder / "standardizer.pt", weights_only=True)
        x_scaler = Standardizer.from_state_dict(scalers["x"])
        y_scaler = Standardizer.from_state_dict(scalers["y"]) if "y" in scalers else None
        la = Laplace(
            model,
            config["likelihood"],
            subset_of_weights=config["subset_of_weights"],
            hessian_structure=config["hessian_structure"],
        )
        la.load_state_dict(torch.load(folder / "laplace.pt", weights_only=True))
    except Exception as err:  # any broken or foreign file: one line, not a traceback
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"{path!r} is not a loadable marglik model: {reason}") from None
    return config, la, x_scaler, y_scaler


def read_features(path: str, features: list[str]) -> Tensor:
    """The named columns of a CSV file as a float32 tensor (N, D); CLIError on bad input."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(
            f"data file {path!r} "
            + ("is a directory, not a file" if p.is_dir() else "does not exist")
        )
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CLIError(f"could not read {path!r}: {err}") from None
    missing = [c for c in features if c not in header]
    if missing:
        raise CLIError(f"{path!r} lacks feature column(s) {missing} that the model was trained on")
    if not rows:
        raise CLIError(f"{path!r} has no data rows")
    index = [header.index(c) for c in features]
    values = torch.empty(len(rows), len(features))
    nan_cells: list[str] = []
    for i, (line, row) in enumerate(rows):
        if len(row) != len(header):
            raise CLIError(
                f"{path!r} line {line} has {len(row)} fields but the header has {len(header)}"
            )
        for j, k in enumerate(index):
            cell = row[k].strip()
            try:
                v = float(cell) if cell else math.nan
            except ValueError:
                raise CLIError(
                    f"{path!r}: column {features[j]!r} has non-numeric value {cell!r} "
                    f"at line {line}"
                ) from None
            if math.isnan(v) or math.isinf(v):
                nan_cells.append(f"{features[j]!r} line {line}")
            values[i, j] = v
    if nan_cells:
        shown = ", ".join(nan_cells[:3]) + (", ..." if len(nan_cells) > 3 else "")
        raise CLIError(
            f"{path!r} has {len(nan_cells)} empty, NaN or infinite feature cell(s): {shown}"
        )
    return values


def cmd_predict(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    config, la, x_scaler, y_scaler = load_model_dir(args.model_dir)
    X = x_scaler.transform(read_features(args.data, config["features"]))
    columns: list[str]
    if config["task"] == "classification":
        probs = class_probabilities(la, X)
        classes = config["classes"]
        columns = [f"p_{c}" for c in classes] + ["label"]
        labels = [classes[k] for k in probs.argmax(-1).tolist()]
        rows = [[f"{p:.6g}" for p in ps] + [str(lab)] for ps, lab in zip(probs.tolist(), labels)]
    else:
        f_mean, f_var = la(X)
        f_var = f_var.reshape(len(X), -1)[:, 0]
        scale = y_scaler.std.reshape(()).item()
        mean = y_scaler.inverse_transform(f_mean.reshape(-1, 1)).reshape(-1)
        std_f = f_var.clamp_min(0).sqrt() * scale
        std_y = (f_var.clamp_min(0) + la.sigma_noise.reshape(()) ** 2).sqrt() * scale
        columns = ["mean", "std_with_noise", "std_without_noise"]
        rows = [
            [f"{m:.6g}", f"{s:.6g}", f"{e:.6g}"]
            for m, s, e in zip(mean.tolist(), std_y.tolist(), std_f.tolist())
        ]
    if args.out is None:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        try:
            writer.writerow(columns)
            writer.writerows(rows)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0
    try:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
    except OSError as err:
        raise CLIError(f"cannot write {args.out!r}: {err.strerror}") from None
    print(f"marglik predict: wrote {len(rows)} rows ({', '.join(columns)}) to {args.out}")
    return 0


# ---- registration -----------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit",
        help="train a Bayesian MLP on a CSV table, hyperparameters tuned by the evidence",
        description="Train an MLP on DATA.csv with its prior precision (and noise) tuned by the "
        "Laplace evidence, and save model, posterior and standardiser to --out.",
    )
    fit.add_argument("data", metavar="DATA.csv", help="CSV file with a header row")
    fit.add_argument("--target", required=True, help="name of the target column")
    fit.add_argument(
        "--task",
        choices=["regression", "classification"],
        default=None,
        help="default: inferred (integer targets with <= 20 values or string labels are classes)",
    )
    fit.add_argument("--out", default="marglik-model", help="model folder (default: %(default)s)")
    fit.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: 1000 for tables up to {FULL_BATCH_MAX} rows, trained "
        f"full-batch; 100 for larger ones, in mini-batches of {BATCH_SIZE})",
    )
    fit.add_argument(
        "--evidence-every",
        type=int,
        default=None,
        help="epochs between evidence updates of the hyperparameters (default: epochs / 20)",
    )
    fit.add_argument(
        "--hidden", default="50", help="hidden widths, e.g. 50 or 50,50 (default: %(default)s)"
    )
    fit.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small MLPs)",
    )
    fit.set_defaults(func=cmd_fit)

    predict = subparsers.add_parser(
        "predict",
        help="predictive means and uncertainties from a 'marglik fit' model",
        description="Write predictions for the rows of DATA.csv as CSV: regression mean and "
        "std (with and without noise, original units); classification class "
        "probabilities and the predicted label.",
    )
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by 'marglik fit'")
    predict.add_argument("data", metavar="DATA.csv", help="CSV file with the feature columns")
    predict.add_argument("--out", default=None, help="output CSV (default: standard output)")
    predict.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    predict.set_defaults(func=cmd_predict)
