"""KFAC Laplace for ResNet-18 / ResNet-50 on a CPU: fit and predictive against a training epoch.

    python benchmarks/resnet.py [--models resnet18 resnet50] [--n 64] [--batch 32] [--test 32]
                                [--cases ggn-expand ggn-reduce sampled-expand sampled-reduce]
                                [--profile] [--width 64]

Plain-torch ResNets for CIFAR-size inputs (3×3 stem, no max-pool; ResNet-18 with basic blocks,
ResNet-50 with bottleneck blocks), random initialisation (seed 0), BatchNorm in eval mode (running
statistics at their initial values), on sklearn digits upsampled to 3×32×32. One thread, float32,
one process: all ratios below are within one run, so a shared machine's load affects numerator
and denominator alike.

Per model it prints JSON lines:

- ``epoch``: one pass of SGD training over the same batches (forward + backward + step), and the
  same without the step (``fwd_bwd_s``, ``fwd_bwd_cpu_s``: the faster of two passes after a
  warm-up on one full batch);
- ``fit`` per case: ``Laplace(model, "classification", hessian_structure="kron")`` with the exact
  GGN (``ggn``: C − 1 = 9 columns per input) or one sampled column (``ggn-sampled``,
  ``mc_samples=1``), KFAC-expand or -reduce; ``fit_over_epoch`` is fit time / epoch time;
- ``predictive``: ``la(x_test, pred_type="glm", link_approx="probit")`` on the first fitted
  posterior, cold (with the eigendecompositions of the factors, timed separately as
  ``eig_s``) and warm; ``pred_over_fwd_bwd`` is the warm predictive per input over one forward +
  backward per input;
- ``profile`` (``--profile``): the top operators (self CPU time) of a fit and of a warm predictive
  (``torch.profiler``).

Peak memory is the process's peak resident set (``VmHWM``), reset before each step
(``/proc/self/clear_refs``), so ``peak_rss_mb`` is the peak of that step including everything
resident before it (model, data, earlier posteriors are freed before the next fit).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split

CASES = {  # name -> (curvature, kfac_approx)
    "ggn-expand": ("ggn", "expand"),
    "ggn-reduce": ("ggn", "reduce"),
    "sampled-expand": ("ggn-sampled", "expand"),
    "sampled-reduce": ("ggn-sampled", "reduce"),
}


# ------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, h):
        out = torch.relu(self.bn1(self.conv1(h)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(h))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, h):
        out = torch.relu(self.bn1(self.conv1(h)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(h))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """CIFAR-variant ResNet (3×3 stem, no max-pool) for 3×32×32 inputs, plain torch."""

    def __init__(self, block: type[nn.Module], depths: tuple[int, ...], n_classes: int = 10,
                 width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for stage, depth in enumerate(depths):
            w = width * 2**stage
            for i in range(depth):
                layers.append(block(c_in, w, 2 if (stage > 0 and i == 0) else 1))
                c_in = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes))

    def forward(self, h):
        return self.head(self.layers(self.stem(h)))


MODELS = {
    "resnet18": lambda width: ResNet(BasicBlock, (2, 2, 2, 2), width=width),
    "resnet50": lambda width: ResNet(Bottleneck, (3, 4, 6, 3), width=width),
}


def digits32(n: int, train_split: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n digits (repeated if needed) upsampled to 3×32×32 (bilinear, grey in 3 channels)."""
    x, y, xt, yt = load_digits_split()
    x, y = (x, y) if train_split else (xt, yt)
    tile = -(-n // len(x))
    x, y = x.repeat(tile, 1, 1, 1)[:n], y.repeat(tile)[:n]
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), y


# ------------------------------------------------------------------------------------ helpers
def _status_kb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter of this process to the current RSS."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    return round(_status_kb("VmHWM") / 1024, 1)


def timed(fn) -> tuple[float, float, object]:
    """(wall s, process CPU s, result)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def sgd_epoch(model: nn.Module, loader: DataLoader, step: bool = True) -> None:
    """One pass over the batches: forward, backward (and an SGD step if ``step``).

    BatchNorm stays in eval mode, as in the fit (the ratio is about the same computation)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if step:
            opt.step()


def top_ops(prof, k: int = 15) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
            for e in events[:k]]


# ---------------------------------------------------------------------------------------- run
def run_model(name: str, args) -> None:
    torch.manual_seed(0)
    model = MODELS[name](args.width).eval()
    n_params = sum(p.numel() for p in model.parameters())
    x, y = digits32(args.n)
    xt = digits32(args.test, train_split=False)[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    head = {"model": name, "width": args.width, "params": n_params, "n": args.n,
            "batch": args.batch}

    sgd_epoch(model, DataLoader(TensorDataset(x[:args.batch], y[:args.batch]),
                                batch_size=args.batch), step=False)  # warm-up, one full batch
    reset_peak()
    # the denominator of every ratio: the faster of two passes (wall and CPU time each)
    passes = [timed(lambda: sgd_epoch(model, loader, step=False)) for _ in range(2)]
    t_fb, c_fb = min(p[0] for p in passes), min(p[1] for p in passes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    t_ep, c_ep, _ = timed(lambda: sgd_epoch(model, loader))
    model.load_state_dict(state)  # the posterior is fitted at the initial weights
    epoch_s = t_ep
    emit({"kind": "epoch", **head, "epoch_s": round(t_ep, 3), "epoch_cpu_s": round(c_ep, 3),
          "fwd_bwd_s": round(t_fb, 3), "fwd_bwd_cpu_s": round(c_fb, 3),
          "fwd_bwd_per_input_s": round(t_fb / args.n, 4),
          "peak_rss_mb": peak_mb(), "load": load()})
    for p in model.parameters():
        p.grad = None

    first = None
    for case in args.cases:
        curvature, approx = CASES[case]
        la = marglik.Laplace(model, "classification", hessian_structure="kron",
                             kfac_approx=approx, curvature=curvature, mc_samples=1)
        reset_peak()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BatchNorm: diagonal blocks (expected)
            t_fit, c_fit, _ = timed(lambda la=la: la.fit(loader))
        emit({"kind": "fit", **head, "case": case, "curvature": curvature, "kfac_approx": approx,
              "fit_s": round(t_fit, 3), "fit_cpu_s": round(c_fit, 3),
              "fit_over_epoch": round(t_fit / epoch_s, 2),
              "fit_over_epoch_cpu": round(c_fit / c_ep, 2),
              "fit_per_1000_s": round(1000 * t_fit / args.n, 1),
              "peak_rss_mb": peak_mb(), "load": load()})
        if first is None:
            first = (case, la)
        del la
        gc.collect()

    if first is not None and not args.no_predictive:
        case, la = first
        la.prior_precision = args.prior
        reset_peak()
        # eigendecompositions of the factors (cached by the structures; part of the cold call)
        t_eig, _, _ = timed(lambda: [b.eig() for b in la.H.blocks if hasattr(b, "eig")])
        with torch.no_grad():
            t_cold, c_cold, probs = timed(
                lambda: la(xt, pred_type="glm", link_approx="probit"))
            t_warm, c_warm, probs = timed(
                lambda: la(xt, pred_type="glm", link_approx="probit"))
        per_input = t_warm / args.test
        emit({"kind": "predictive", **head, "fitted_case": case, "n_test": args.test,
              "eig_s": round(t_eig, 2), "cold_s": round(t_cold, 3), "warm_s": round(t_warm, 3),
              "warm_cpu_s": round(c_warm, 3), "per_input_s": round(per_input, 4),
              "pred_over_fwd_bwd": round(per_input / (t_fb / args.n), 2),
              "pred_over_fwd_bwd_cpu": round((c_warm / args.test) / (c_fb / args.n), 2),
              "probs_finite": bool(torch.isfinite(probs).all()),
              "peak_rss_mb": peak_mb(), "load": load()})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            fit_case = CASES[args.cases[0]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    marglik.Laplace(model, "classification", hessian_structure="kron",
                                    curvature=fit_case[0], kfac_approx=fit_case[1]).fit(loader)
            emit({"kind": "profile", **head, "step": f"fit {args.cases[0]}",
                  "top": top_ops(prof)})
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
                la(xt, pred_type="glm", link_approx="probit")
            emit({"kind": "profile", **head, "step": "predictive (warm)", "top": top_ops(prof)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=list(MODELS))
    parser.add_argument("--n", type=int, default=64, help="inputs fitted (and trained on)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--test", type=int, default=32, help="inputs of the predictive")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--prior", type=float, default=1.0, help="prior precision δ")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-predictive", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    emit({"kind": "setup", "torch": torch.__version__, "commit": commit.strip(),
          "marglik": os.path.dirname(marglik.__file__),
          "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
          "cores": os.cpu_count(), "load": load(), "args": vars(args)})
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
