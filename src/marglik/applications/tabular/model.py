"""The tabular model and its folder format: network, posterior, standardisers; predictions.

:class:`TabularModel` bundles the ``config.json`` content, the Laplace posterior around the
trained network and the standardisers; :meth:`TabularModel.save` and :meth:`TabularModel.load`
write and read the model folder, :meth:`TabularModel.predict` gives the GLM predictive in the
target's original units.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marglik.data import Standardizer
from marglik.errors import MarglikError
from marglik.nets import mlp
from marglik.posterior import Laplace

__all__ = ["FILES", "FORMAT", "TabularModel", "TabularPrediction", "build_network"]

#: format tag written to ``config.json``
FORMAT = "marglik.tabular/1"
#: files a model folder holds
FILES = ("model.pt", "laplace.pt", "standardizer.pt", "config.json", "report.json")


def build_network(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Sequential:
    """The MLP ``n_in → hidden[0] → … → n_out`` with tanh activations."""
    return mlp([n_in, *hidden, n_out], nn.Tanh)


def class_probabilities(la: Laplace, X: Tensor) -> Tensor:
    """GLM predictive with the probit link (deterministic): (N, C)."""
    return la(X, pred_type="glm", link_approx="probit")


@dataclass
class TabularPrediction:
    """Predictions for the rows of a table, in the target's original units.

    Classification: ``probs`` (N, C) and the predicted ``labels`` (original class labels).
    Regression: ``mean``, ``std_with_noise`` and ``std_without_noise``, each (N,).
    """

    task: str
    probs: Tensor | None = None
    labels: list[int | float | str] | None = None
    mean: Tensor | None = None
    std_with_noise: Tensor | None = None
    std_without_noise: Tensor | None = None


@dataclass
class TabularModel:
    """A trained tabular model: its config, Laplace posterior and standardisers.

    Attributes:
        config: the ``config.json`` content (format, task, features, target, classes, hidden
            widths, likelihood and posterior structure).
        laplace: the all-weights KFAC Laplace posterior around the trained network.
        x_scaler: standardiser of the features.
        y_scaler: standardiser of the regression target; None for classification.
    """

    config: dict[str, Any]
    laplace: Laplace
    x_scaler: Standardizer
    y_scaler: Standardizer | None = None

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return self.config["task"]

    @property
    def features(self) -> list[str]:
        """Names of the feature columns, in the order the network reads them."""
        return self.config["features"]

    def _inputs(self, X: Tensor) -> Tensor:
        """Raw features (N, D) → the standardised inputs of the network."""
        X = torch.as_tensor(X)
        if X.dim() != 2 or X.shape[1] != len(self.features):
            raise ValueError(f"X must have shape (N, {len(self.features)}), got "
                             f"{tuple(X.shape)}")
        return self.x_scaler.transform(X.to(self.x_scaler.mean.dtype))

    def _class_probabilities(self, x: Tensor) -> Tensor:
        """Class probabilities (N, C) at standardised inputs ``x`` (GLM probit)."""
        return class_probabilities(self.laplace, x)

    def predict(self, X: Tensor) -> TabularPrediction:
        """GLM predictive for raw (unstandardised) features ``X`` of shape (N, D)."""
        x, la = self._inputs(X), self.laplace
        if self.task == "classification":
            probs = self._class_probabilities(x)
            classes = self.config["classes"]
            labels = [classes[k] for k in probs.argmax(-1).tolist()]
            return TabularPrediction(self.task, probs=probs, labels=labels)
        f_mean, f_var = la(x)
        f_var = f_var.reshape(len(x), -1)[:, 0].clamp_min(0).detach()
        scale = self.y_scaler.std.reshape(()).item()
        mean = self.y_scaler.inverse_transform(f_mean.detach().reshape(-1, 1)).reshape(-1)
        sigma2 = la.sigma_noise.detach().reshape(()) ** 2
        return TabularPrediction(self.task, mean=mean,
                                 std_with_noise=(f_var + sigma2).sqrt() * scale,
                                 std_without_noise=f_var.sqrt() * scale)

    def state(self) -> dict[str, Any]:
        """Everything the model is, as JSON-able config and plain tensors (no pickled code):
        ``{"config", "model", "laplace", "scalers"}``; :meth:`from_state` rebuilds it."""
        scalers = {"x": self.x_scaler.state_dict()}
        if self.y_scaler is not None:
            scalers["y"] = self.y_scaler.state_dict()
        return {
            "config": dict(self.config),
            "model": self.laplace.model.state_dict(),
            "laplace": self.laplace.state_dict(),
            "scalers": scalers,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TabularModel:
        """Rebuild a model from :meth:`state` (errors come from torch / the posterior)."""
        config = state["config"]
        dtype = {"float32": torch.float32, "float64": torch.float64}[
            config.get("dtype", "float32")
        ]
        model = build_network(len(config["features"]), config["hidden"], config["n_outputs"])
        model.to(dtype).load_state_dict(state["model"])
        scalers = state["scalers"]
        x_scaler = Standardizer.from_state_dict(scalers["x"])
        y_scaler = Standardizer.from_state_dict(scalers["y"]) if "y" in scalers else None
        la = Laplace(
            model,
            config["likelihood"],
            subset_of_weights=config["subset_of_weights"],
            hessian_structure=config["hessian_structure"],
        )
        la.load_state_dict(state["laplace"])
        return cls(config, la, x_scaler, y_scaler)

    def save(self, folder: str | Path, report: dict[str, Any] | None = None) -> Path:
        """Write the model folder (``report.json`` only when ``report`` is given)."""
        return write_model_folder(folder, self.state(), report)

    @classmethod
    def load(cls, folder: str | Path) -> TabularModel:
        """Read a model folder written by :meth:`save` (``marglik fit``)."""
        return read_model_folder(
            folder, FORMAT, "a marglik model folder (no valid config.json from 'marglik fit')",
            cls.from_state)


def write_model_folder(folder: str | Path, state: dict[str, Any],
                       report: dict[str, Any] | None = None) -> Path:
    """Write a model folder: ``state``'s ``"model"``, ``"laplace"`` and ``"scalers"`` as
    ``model.pt``, ``laplace.pt``, ``standardizer.pt``, its ``"config"`` as ``config.json``, and
    ``report.json`` when ``report`` is given (shared by every ``marglik fit`` model kind)."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MarglikError(f"cannot create model folder {str(out)!r}: {err.strerror}") from None
    torch.save(state["model"], out / "model.pt")
    torch.save(state["laplace"], out / "laplace.pt")
    torch.save(state["scalers"], out / "standardizer.pt")
    (out / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def read_model_folder(folder: str | Path, fmt: str, expected: str,
                      from_state: Callable[[dict[str, Any]], Any]) -> Any:
    """Read a folder of :func:`write_model_folder` whose config has format ``fmt`` into
    ``from_state(state)`` (all ``.pt`` files with ``weights_only=True``).

    Raises:
        MarglikError: the folder is missing, its config is not of format ``fmt`` ("... is not
            ``expected``"), or a file cannot be loaded (one line).
    """
    path, folder = str(folder), Path(folder)
    if not folder.is_dir():
        raise MarglikError(f"model folder {path!r} does not exist or is not a folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise MarglikError(f"{path!r} is not {expected}")
    try:
        return from_state({
            "config": config,
            "model": torch.load(folder / "model.pt", weights_only=True),
            "laplace": torch.load(folder / "laplace.pt", weights_only=True),
            "scalers": torch.load(folder / "standardizer.pt", weights_only=True),
        })
    except Exception as err:  # any broken or foreign file: one line, not a traceback
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MarglikError(f"{path!r} is not a loadable marglik model: {reason}") from None
