"""Side-by-side benchmark against laplace-torch: same models, weights and data (JSON lines).

    python benchmarks/vs_laplace_torch.py                     # timing: both libraries, one process
    python benchmarks/vs_laplace_torch.py --memory            # peak memory, one subprocess per step
    python benchmarks/vs_laplace_torch.py --agreement         # float64 numbers vs laplace-torch
    python benchmarks/vs_laplace_torch.py --fit-ratio         # fit cost / epoch cost
    python benchmarks/vs_laplace_torch.py --scale             # ResNet-18 KFAC (no laplace-torch)
    python benchmarks/vs_laplace_torch.py --table run.jsonl   # Markdown tables of saved output
    options: --repeats 3 --tile 1 --cases mlp-all-kron cnn-all-diag ... --batch-size 128

Run it with a Python that has both ``marglik`` and ``laplace-torch`` (e.g. a separate virtualenv:
``pip install --no-deps -e .`` next to laplace-torch's own torch); ``--fit-ratio`` and ``--scale``
need only marglik.

Setting. sklearn digits (``marglik.data.load_digits_split``: 1,257 training / 540 test images,
1×8×8, float32; ``--tile k`` repeats the training set k times to measure scaling). Models: MLP
64-256-256-10 (85,002 parameters) and CNN Conv(1→16,3,p1)-ReLU-Conv(16→32,3,p1)-ReLU-MaxPool(2)-
Flatten-Linear(512→10) (9,930 parameters), both taken from ``benchmarks/fit.py``, and a small MLP
64-32-32-10 (3,466 parameters) for the full structure. The MLPs flatten their input with
``nn.Flatten`` so both libraries see the same 1×8×8 tensors. Every model is trained briefly
before the comparison (10 epochs of Adam, lr 1e-3, batch 32, seed 0, on the un-tiled training
set) and both libraries get deep copies of the same trained weights and the same DataLoader
(batch 128, not shuffled).

Steps per case (subset × structure): ``fit``; 100 evidence steps (Adam, lr 0.1, from δ = 1) with
a scalar prior (``evidence_scalar``; the first call after the fit, so it includes the one-off
eigendecompositions of marglik's lazily decomposed curvature — laplace-torch decomposes KFAC
inside ``fit``), the same again (``evidence_scalar_warm``) and with a layer-wise prior
(``evidence_layerwise``); the GLM-probit predictive on the 540 test images in one call
(``predictive``). laplace-torch forms the B×C×P Jacobian of the whole batch, which does not fit
this machine for all weights, so it is also timed in 10 calls of 54 images
(``predictive_chunked``). On request (``--steps ... evidence_layerwise_optimum``), marglik's
L-BFGS from δ = 1 to the layer-wise evidence optimum (issue 19 item 4), timed against
laplace-torch's 100 Adam steps; the log evidence each library's δ reaches is in the agreement
line. Timing alternates the two libraries (marglik first in even
repetitions, laplace-torch first in odd ones), single thread, and prints the median.

Guards. laplace-torch's diagonal GGN (default curvlinops backend) builds full Jacobians (issue
#281) and its all-weights predictive materialises B×C×P: those steps run in a subprocess with
``resource.setrlimit(RLIMIT_AS, cap)`` (default 20 GB, lowered to the memory available) and a
time limit, and are recorded as "did not finish" when they hit either. A step whose first run
takes longer than ``--slow`` seconds is not repeated.

Memory (``--memory``): each (library, case, step) runs in a fresh subprocess that loads the
trained weights (and, after ``fit``, the fitted posterior saved by the ``fit`` subprocess).
After loading it resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), so that the
peak of the step is not hidden by the one of the set-up, then reports the peak resident memory
during the step minus the resident memory just before it. ``getrusage(RUSAGE_SELF).ru_maxrss``
reads the same counter and is reported as a cross-check (it can also include the parent's peak
inherited across exec).

Agreement (``--agreement``): float64, log evidence at fixed prior precisions, on one full batch
for KFAC (laplace-torch's KFAC rescales each batch's factors separately, so it depends on the
batch size; ours sums A and G over batches first); conv-layer KFAC conventions compared across
laplace-torch's three backends and ours against the brute-force GGN of ``tests/oracle.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import fit as fit_bench  # noqa: E402  (benchmarks/fit.py: the same models and the epoch timer)

N_EVIDENCE_STEPS = 100
TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_LR = 10, 32, 1e-3
PRED_CHUNKS = 10  # laplace-torch's chunked predictive: 10 calls of 54 images

# ------------------------------------------------------------------------------- models, cases


def mlp32() -> nn.Module:
    """MLP 64-32-32-10, 3,466 parameters: small enough for the full structure."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


MODELS = {"mlp": fit_bench.mlp, "mlp32": mlp32, "cnn": fit_bench.cnn}


@dataclass(frozen=True)
class Case:
    model: str
    subset: str  # "all" | "last_layer"
    structure: str  # "full" | "kron" | "diag"
    approx: str = "expand"

    @property
    def name(self) -> str:
        sub = "all" if self.subset == "all" else "ll"
        suffix = f"-{self.approx}" if self.model == "cnn" and self.structure == "kron" else ""
        return f"{self.model}-{sub}-{self.structure}{suffix}"


CASES = [
    Case("mlp", "all", "kron"),
    Case("mlp", "all", "diag"),
    Case("mlp", "last_layer", "kron"),
    Case("mlp", "last_layer", "diag"),
    Case("mlp", "last_layer", "full"),  # 2,570 parameters
    Case("mlp32", "all", "full"),  # 3,466 parameters
    Case("mlp32", "all", "kron"),
    Case("mlp32", "all", "diag"),
    Case("cnn", "all", "kron", "expand"),
    Case("cnn", "all", "kron", "reduce"),
    Case("cnn", "all", "diag"),
    Case("cnn", "last_layer", "kron"),
    Case("cnn", "last_layer", "diag"),
]
CASE_BY_NAME = {c.name: c for c in CASES}

STEPS = ["fit", "evidence_scalar", "evidence_scalar_warm", "evidence_layerwise", "predictive"]
LT_ONLY_STEPS = ["predictive_chunked"]
# marglik's L-BFGS to the optimum, compared with laplace-torch's 100 Adam steps (issue 19 item 4)
ML_ONLY_STEPS = ["evidence_layerwise_optimum"]
ALL_STEPS = STEPS + LT_ONLY_STEPS + ML_ONLY_STEPS


def guarded(lib: str, case: Case, step: str) -> bool:
    """laplace-torch steps that can take tens of GB: run them in a capped subprocess."""
    if lib != "laplace-torch" or case.subset != "all":
        return False
    return (step == "fit" and case.structure == "diag") or step == "predictive"


def target(case: Case, step: str) -> tuple[float | None, float | None]:
    """(time ratio target, memory ratio target) marglik / laplace-torch, None if none."""
    if case.subset != "all":
        return None, None
    if step == "fit" and case.structure == "kron":
        return 0.5, None
    if step == "fit" and case.structure == "diag":
        return 0.01, None
    if step == "predictive" and case.structure == "kron":
        return 0.05, 0.2
    if step == "evidence_layerwise_optimum" and case.structure == "full":
        return 0.05, None  # issue 19 item 4: time to the optimum against 100 Adam steps
    if step.startswith("evidence") and case.structure == "full" and case.model == "mlp32":
        return 0.01, None
    return None, None


# ------------------------------------------------------------------------------- data, training


def digits(tile: int = 1, dtype: torch.dtype = torch.float32):
    x, y, xt, yt = load_digits_split(dtype=dtype)
    return x.repeat(tile, 1, 1, 1), y.repeat(tile), xt, yt


def train(name: str, seed: int = 0) -> nn.Module:
    """Brief training: 10 epochs of Adam (lr 1e-3, batch 32, shuffled with a seeded generator)."""
    torch.manual_seed(seed)
    x, y, _, _ = digits()
    model = MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=TRAIN_BATCH, shuffle=True, generator=gen)
    for _ in range(TRAIN_EPOCHS):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def trained_model(name: str, folder: str) -> nn.Module:
    path = os.path.join(folder, f"model_{name}.pt")
    model = MODELS[name]()
    if not os.path.exists(path):
        torch.save(train(name).state_dict(), path)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


# ------------------------------------------------------------------------------- the two sides


class Marglik:
    name = "marglik"

    def build(self, model: nn.Module, case: Case):
        return marglik.Laplace(
            model, "classification", subset_of_weights=case.subset,
            hessian_structure=case.structure, kfac_approx=case.approx,
        )

    def fit(self, la, loader) -> None:
        la.fit(loader)

    def evidence(self, la, prior_structure: str) -> torch.Tensor:
        la.optimize_prior_precision(
            method="marglik", prior_structure=prior_structure, n_steps=N_EVIDENCE_STEPS,
            init_prior_prec=1.0,
        )
        return la.prior_precision.detach().reshape(-1).double()

    def evidence_optimum(self, la, prior_structure: str) -> torch.Tensor:
        """L-BFGS from δ = 1 until the evidence gradient is at rounding level (issue 19 item 4)."""
        la.optimize_prior_precision(
            method="marglik", prior_structure=prior_structure, optimizer="lbfgs",
            n_steps=N_EVIDENCE_STEPS, init_prior_prec=1.0,
        )
        return la.prior_precision.detach().reshape(-1).double()

    def log_evidence(self, la, delta: torch.Tensor) -> float:
        return float(la.log_marginal_likelihood(delta.to(la.H.dtype)))

    def set_prior(self, la, delta: torch.Tensor) -> None:
        la.prior_precision = delta.reshape(()) if delta.numel() == 1 else delta

    def predictive(self, la, x: torch.Tensor) -> torch.Tensor:
        return la(x, pred_type="glm", link_approx="probit")

    def moments(self, la, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from marglik.predictive import glm_moments

        return glm_moments(la, x)

    def save(self, la, path: str) -> None:
        torch.save(la.state_dict(), path)

    def load(self, la, path: str) -> None:
        la.load_state_dict(torch.load(path, weights_only=True))


class LaplaceTorch:
    name = "laplace-torch"

    def __init__(self):
        import laplace

        self.laplace = laplace

    def build(self, model: nn.Module, case: Case):
        kwargs = {}
        if case.structure == "kron" and case.subset == "all":
            # laplace-torch 0.3 exposes curvlinops' KFAC flavour only through this argument
            kwargs["asdl_fisher_kwargs"] = {"kfac_approx": case.approx}
        return self.laplace.Laplace(
            model, "classification", subset_of_weights=case.subset,
            hessian_structure=case.structure, **kwargs,
        )

    def fit(self, la, loader) -> None:
        la.fit(loader)

    def evidence(self, la, prior_structure: str) -> torch.Tensor:
        la.optimize_prior_precision(
            method="marglik", pred_type="glm", link_approx="probit",
            prior_structure=prior_structure, n_steps=N_EVIDENCE_STEPS, init_prior_prec=1.0,
        )
        return torch.as_tensor(la.prior_precision).detach().reshape(-1).double()

    def log_evidence(self, la, delta: torch.Tensor) -> float:
        return float(la.log_marginal_likelihood(prior_precision=delta.reshape(-1).to(la._dtype)))

    def set_prior(self, la, delta: torch.Tensor) -> None:
        la.prior_precision = delta.reshape(-1).to(la._dtype)

    def predictive(self, la, x: torch.Tensor) -> torch.Tensor:
        return la(x, pred_type="glm", link_approx="probit")

    def predictive_chunked(self, la, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.predictive(la, xc) for xc in x.chunk(PRED_CHUNKS)])

    def moments(self, la, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, covs = zip(*(la._glm_predictive_distribution(xc) for xc in x.chunk(PRED_CHUNKS)))
        return torch.cat(means), torch.cat(covs)

    def save(self, la, path: str) -> None:
        torch.save(la.state_dict(), path)

    def load(self, la, path: str) -> None:
        # our own temporary file; laplace-torch's state holds its enums, so not weights_only
        la.load_state_dict(torch.load(path, weights_only=False))


def side(lib: str):
    return Marglik() if lib == "marglik" else LaplaceTorch()


def run_step(lib, la, step: str, loader, xt) -> object:
    """One timed step; returns what the step produced (tuned δ, probabilities, ...)."""
    if step == "fit":
        return lib.fit(la, loader)
    if step in ("evidence_scalar", "evidence_scalar_warm"):
        return lib.evidence(la, "scalar")
    if step == "evidence_layerwise":
        return lib.evidence(la, "layerwise")
    if step == "evidence_layerwise_optimum":
        return lib.evidence_optimum(la, "layerwise")
    if step == "predictive":
        return lib.predictive(la, xt)
    if step == "predictive_chunked":
        return lib.predictive_chunked(la, xt)
    raise ValueError(step)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------- memory helpers


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) / 2**20
    return float("nan")


def warm_up() -> None:
    """One-off process costs that belong to neither library: the first ``torch.optim.Adam``
    imports ``torch._dynamo`` (about 3 s and 125 MB with torch 2.14), the first LAPACK calls."""
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1)
    (p.square().sum() + torch.linalg.eigh(torch.eye(3))[0].sum()).backward()
    opt.step()


def measure_in_child(lib_name: str, case: Case, step: str, folder: str, tile: int,
                     batch_size: int, save: bool) -> dict:
    """Body of a child process: set up, reset the peak counter, run one step, report."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    lib = side(lib_name)
    x, y, xt, _ = digits(tile)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    model = trained_model(case.model, folder)
    la = lib.build(model, case)
    state = os.path.join(folder, f"state_{lib_name}_{case.name}_{tile}.pt")
    if step != "fit":
        if not os.path.exists(state):
            return {"status": "not run (no fitted posterior)"}
        lib.load(la, state)  # laplace-torch's last-layer state finds its last layer itself
    if step == "evidence_scalar_warm":
        lib.evidence(la, "scalar")
    warm_up()
    gc.collect()
    ok = reset_peak()
    before_kb = _status_kb("VmRSS")
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, _ = timed(lambda: run_step(lib, la, step, loader, xt))
    hwm_kb = _status_kb("VmHWM")
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if save and step == "fit":
        lib.save(la, state)
    return {
        "status": "ok",
        "time_s": round(seconds, 4),
        "rss_before_mb": round(before_kb / 1024, 1),
        "peak_delta_mb": round((hwm_kb - before_kb) / 1024, 1) if ok else None,
        "ru_maxrss_delta_mb": round((ru_after - before_kb) / 1024, 1),
        "ru_maxrss_raised": ru_after > ru_before,
    }


def spawn(lib_name: str, case: Case, step: str, folder: str, args, save: bool = True) -> dict:
    """Run one (library, case, step) in a fresh subprocess under the memory and time caps."""
    cap = int(args.cap_gb * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib_name, case.name, step,
           "--folder", folder, "--tile", str(args.tile), "--batch-size", str(args.batch_size)]
    if save:
        cmd.append("--save")
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit,
                             preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish (time limit {args.time_limit} s)",
                "wall_s": round(time.perf_counter() - start, 1)}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [" | ".join(out.stderr.strip().splitlines()[-3:]) or f"exit code {out.returncode}"]
    memory = any(s in out.stderr for s in ("can't allocate memory", "MemoryError",
                                            "Cannot allocate memory", "std::bad_alloc"))
    why = (f"memory cap {args.cap_gb:.0f} GB" if memory
           else "killed" if out.returncode < 0 else "error")
    return {"status": f"did not finish ({why})", "error": err[0][-300:],
            "wall_s": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------- timing mode


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def rel_tensor(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def time_case(case: Case, args, folder: str) -> list[dict]:
    x, y, xt, yt = digits(args.tile)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    base = trained_model(case.model, folder)
    libs = {"marglik": Marglik(), "laplace-torch": LaplaceTorch()}
    load_start = [round(v, 2) for v in os.getloadavg()]
    times = {lib: {s: [] for s in ALL_STEPS} for lib in libs}
    status = {lib: {} for lib in libs}
    posteriors, outputs = {}, {lib: {} for lib in libs}
    for rep in range(args.repeats):
        order = ["marglik", "laplace-torch"] if rep % 2 == 0 else ["laplace-torch", "marglik"]
        for name in order:
            lib = libs[name]
            la = lib.build(copy.deepcopy(base), case)
            steps = STEPS + (LT_ONLY_STEPS if name == "laplace-torch" else ML_ONLY_STEPS)
            for step in [s for s in steps if s == "fit" or s in args.steps]:
                if step in status[name] and status[name][step] != "ok":
                    continue  # did not finish before: do not retry
                done = times[name][step]
                state = os.path.join(folder, f"state_{name}_{case.name}_{args.tile}.pt")
                if done and done[0] > args.slow:  # slow steps run once
                    if step == "fit":  # continue from the posterior of the first fit
                        lib.load(la, state)
                    continue
                if step != "fit" and status[name].get("fit", "ok") != "ok":
                    status[name][step] = "not run (fit did not finish)"
                    continue
                if guarded(name, case, step):
                    if step != "fit":
                        lib.save(la, state)
                    res = spawn(name, case, step, folder, args, save=True)
                    status[name][step] = res["status"]
                    if res["status"] != "ok":
                        print(json.dumps({"kind": "guard", "case": case.name, "library": name,
                                          "step": step, **res}), flush=True)
                        continue
                    done.append(res["time_s"])
                    if step == "fit":  # continue in-process from the child's posterior
                        lib.load(la, state)
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prior = copy.deepcopy(la.prior_precision) if step != "fit" else None
                    try:
                        seconds, out = timed(lambda lib=lib, la=la, step=step:
                                             run_step(lib, la, step, loader, xt))
                    except Exception as err:  # noqa: BLE001 - record what the library does
                        status[name][step] = f"failed: {type(err).__name__}: {err}"[:160]
                        if prior is not None:  # a failed step must not break the next ones
                            la.prior_precision = prior
                        continue
                status[name][step] = "ok"
                done.append(seconds)
                outputs[name][step] = out
                if step == "fit" and seconds > args.slow:
                    lib.save(la, state)  # the next repetitions reuse it instead of refitting
            posteriors[name] = la
    lines = []
    for step in [s for s in ALL_STEPS if s == "fit" or s in args.steps]:
        mt = times["marglik"][step]
        lt = times["laplace-torch"][step]
        if step == "evidence_layerwise_optimum":  # against laplace-torch's 100 Adam steps
            lt = times["laplace-torch"]["evidence_layerwise"]
        t_target, _ = target(case, step)
        m_med = statistics.median(mt) if mt else None
        l_med = statistics.median(lt) if lt else None
        # the chunked laplace-torch predictive is compared with marglik's one-call predictive
        if step == "predictive_chunked":
            m_med = statistics.median(times["marglik"]["predictive"])
        ratio = m_med / l_med if (m_med and l_med) else None
        lines.append({
            "kind": "time", "case": case.name, "model": case.model, "subset": case.subset,
            "structure": case.structure,
            "kfac_approx": case.approx if case.structure == "kron" else None,
            "params": posteriors["marglik"].n_params, "n_train": len(x), "n_test": len(xt),
            "step": step, "marglik_s": _round(m_med), "laplace_torch_s": _round(l_med),
            "ratio": _round(ratio), "target": t_target,
            "met": (ratio <= t_target) if (t_target and ratio is not None) else None,
            "laplace_torch_status": status["laplace-torch"].get(step, "ok"),
            "repeats": [len(mt), len(lt)],
            "marglik_all_s": [round(t, 4) for t in mt],
            "laplace_torch_all_s": [round(t, 4) for t in lt],
            "loadavg_start_end": [load_start, [round(v, 2) for v in os.getloadavg()]],
        })
    try:
        lines.append(agreement_line(case, posteriors, outputs, xt, yt, status))
    except Exception as err:  # noqa: BLE001 - keep the timings of the case
        lines.append({"kind": "agreement_float32", "case": case.name,
                      "error": f"{type(err).__name__}: {err}"[:300]})
    return lines


def _round(v):
    return None if v is None else float(f"{v:.4g}")


def agreement_line(case, posteriors, outputs, xt, yt, status) -> dict:
    """Agreement of the float32 timing run (same batch size for both libraries)."""
    m, lt = Marglik(), LaplaceTorch()
    la_m, la_l = posteriors["marglik"], posteriors["laplace-torch"]
    line = {"kind": "agreement_float32", "case": case.name}
    if status["laplace-torch"].get("fit") != "ok":
        line["status"] = "laplace-torch fit did not finish"
        return line
    one = torch.tensor(1.0, dtype=torch.float64)
    e_m, e_l = m.log_evidence(la_m, one), lt.log_evidence(la_l, one)
    line.update(log_evidence_delta1_marglik=e_m, log_evidence_delta1_laplace_torch=e_l,
                log_evidence_rel_diff=rel(e_m, e_l))
    for key in ("evidence_scalar", "evidence_layerwise"):
        dm, dl = outputs["marglik"].get(key), outputs["laplace-torch"].get(key)
        if dm is not None and dl is not None:
            line[f"tuned_{key[9:]}_prior_max_rel_diff"] = float(((dm - dl).abs() / dl).max())
            line[f"tuned_{key[9:]}_prior_marglik"] = [round(float(v), 5) for v in dm[:8]]
    # the log evidence each tuned layer-wise δ reaches, both evaluated by marglik
    reached = {"marglik_lbfgs": outputs["marglik"].get("evidence_layerwise_optimum"),
               "laplace_torch_adam": outputs["laplace-torch"].get("evidence_layerwise")}
    for who, delta in reached.items():
        if delta is not None:
            line[f"log_evidence_layerwise_{who}"] = m.log_evidence(la_m, delta)
    # predictive moments at one common prior precision (marglik's tuned scalar δ, else 1)
    delta = outputs["marglik"].get("evidence_scalar", torch.tensor(1.0)).reshape(())
    m.set_prior(la_m, delta)
    lt.set_prior(la_l, delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm, vm = m.moments(la_m, xt)
        try:
            fl, vl = lt.moments(la_l, xt)
            pl = lt.predictive_chunked(la_l, xt)
        except (RuntimeError, MemoryError) as err:  # pragma: no cover - machine dependent
            line["predictive"] = f"laplace-torch failed: {err}"[:200]
            return line
    pm = m.predictive(la_m, xt)
    # marglik's probit centres the logits first (links.py); the plain probit is laplace-torch's
    kappa = torch.rsqrt(1 + math.pi / 8 * vm.diagonal(dim1=-2, dim2=-1))
    plain = torch.softmax(kappa * fm, -1)
    line.update(
        probs_plain_probit_max_abs_diff=float((plain.double() - pl.double()).abs().max()),
        common_prior_precision=float(delta),
        pred_mean_rel_diff=rel_tensor(fm, fl),
        pred_var_rel_diff=rel_tensor(vm, vl),
        pred_var_diag_max_rel_diff=float(((vm.diagonal(dim1=-2, dim2=-1).double()
                                            - vl.diagonal(dim1=-2, dim2=-1).double()).abs()
                                           / vl.diagonal(dim1=-2, dim2=-1).double()).max()),
        probs_max_abs_diff=float((pm.double() - pl.double()).abs().max()),
        glm_probit_nll_marglik=float(-pm[torch.arange(len(yt)), yt].log().mean()),
        glm_probit_nll_laplace_torch=float(-pl[torch.arange(len(yt)), yt].log().mean()),
    )
    return line


# ------------------------------------------------------------------------------- memory mode


def memory_case(case: Case, args, folder: str) -> list[dict]:
    lines, results = [], {}
    for name in ("marglik", "laplace-torch"):
        steps = STEPS + (LT_ONLY_STEPS if name == "laplace-torch" else [])
        for step in steps:
            res = spawn(name, case, step, folder, args, save=True)
            results[(name, step)] = res
    for step in STEPS + LT_ONLY_STEPS:
        m = results[("marglik", "predictive" if step == "predictive_chunked" else step)]
        lt = results[("laplace-torch", step)]
        _, m_target = target(case, step)
        ratio = None
        if m.get("peak_delta_mb") is not None and lt.get("peak_delta_mb"):
            ratio = m["peak_delta_mb"] / max(lt["peak_delta_mb"], 1e-9)
        lines.append({
            "kind": "memory", "case": case.name, "step": step,
            "marglik_peak_delta_mb": m.get("peak_delta_mb"),
            "laplace_torch_peak_delta_mb": lt.get("peak_delta_mb"),
            "ratio": _round(ratio), "target": m_target,
            "met": (ratio <= m_target) if (m_target and ratio is not None) else None,
            "marglik": m, "laplace_torch": lt,
        })
    return lines


# ------------------------------------------------------------------------------- agreement mode


def agreement(args) -> list[dict]:
    """float64 log evidence vs laplace-torch (MLPs, CNN) and conv KFAC conventions."""
    lt = LaplaceTorch()
    lines = []
    x, y, _, _ = digits(1, torch.float64)
    full_batch = DataLoader(TensorDataset(x, y), batch_size=len(x))
    batched = DataLoader(TensorDataset(x, y), batch_size=64)
    small = DataLoader(TensorDataset(x, y), batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: trained_model(name, tmp).double() for name in MODELS}
        torch.set_default_dtype(torch.float64)
        checks = [
            ("mlp32", "all", "full", "expand", batched),
            ("mlp32", "all", "kron", "expand", full_batch),
            ("mlp32", "all", "diag", "expand", batched),
            ("mlp", "all", "kron", "expand", full_batch),
            ("mlp", "all", "diag", "expand", batched),
            ("mlp", "last_layer", "full", "expand", batched),
            ("cnn", "all", "kron", "expand", full_batch),
            ("cnn", "all", "kron", "reduce", full_batch),
            ("cnn", "all", "diag", "expand", small),
        ]
        for name, subset, structure, approx, loader in checks:
            case = Case(name, subset, structure, approx)
            la_m = Marglik().build(copy.deepcopy(models[name]), case)
            la_l = lt.build(copy.deepcopy(models[name]), case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_m, _ = timed(lambda la=la_m: la.fit(full_batch))
                t_l, _ = timed(lambda la=la_l, ld=loader: la.fit(ld))
            n_groups = len(la_m.subset.names)
            priors = {
                "scalar 1.0": torch.tensor(1.0),
                "scalar 0.01": torch.tensor(0.01),
                "layerwise 10^U(-2,2)": 10 ** torch.linspace(-2, 2, n_groups),
            }
            for label, delta in priors.items():
                e_m = float(la_m.log_marginal_likelihood(delta))
                line = {"kind": "agreement_float64", "case": case.name, "params": la_m.n_params,
                        "prior": label, "marglik": e_m, "laplace_torch_batch": loader.batch_size,
                        "fit_s": [round(t_m, 3), round(t_l, 3)]}
                try:
                    e_l = float(la_l.log_marginal_likelihood(prior_precision=delta.reshape(-1)))
                    line.update(laplace_torch=e_l, rel_diff=float(f"{rel(e_m, e_l):.3g}"),
                                within_1e_4=rel(e_m, e_l) <= 1e-4)
                except ValueError as err:  # e.g. last-layer + layer-wise prior, laplace-torch #116
                    line.update(laplace_torch=None, error=f"laplace-torch: {err}")
                lines.append(line)
                print(json.dumps(lines[-1]), flush=True)
    lines += conv_conventions()
    torch.set_default_dtype(torch.float32)
    return lines


def conv_conventions() -> list[dict]:
    """Conv-layer KFAC: ours vs laplace-torch's backends, and vs the brute-force GGN."""
    from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN

    sys.path.insert(0, ROOT)
    from tests import oracle  # brute-force torch.func Jacobians and GGN (float64)

    lines = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 4)).double()
    x, y = torch.randn(20, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    import laplace

    for approx in ("expand", "reduce"):
        ours = marglik.Laplace(copy.deepcopy(model), "classification", hessian_structure="kron",
                               kfac_approx=approx).fit(loader).H.blocks[0]
        for backend in (CurvlinopsGGN, AsdlGGN, BackPackGGN):
            kwargs = {"asdl_fisher_kwargs": {"kfac_approx": approx}} if backend is CurvlinopsGGN \
                else {}
            try:
                la = laplace.Laplace(copy.deepcopy(model), "classification",
                                     subset_of_weights="all", hessian_structure="kron",
                                     backend=backend, **kwargs)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    la.fit(loader)
                G, A = la.H_facs.kfacs[0]
                line = {
                    "kind": "conv_convention", "ours": approx, "backend": backend.__name__,
                    "backend_kfac_approx": approx if backend is CurvlinopsGGN else "(fixed)",
                    "positions_R": 16,
                    "A_ratio_backend_over_ours": float(A.norm() / ours.A.norm()),
                    "G_rel_diff": rel_tensor(G, ours.G),
                    "block_rel_diff": rel_tensor(torch.kron(G, A), ours.to_dense()),
                }
            except Exception as err:  # noqa: BLE001 - report whatever the backend does
                line = {"kind": "conv_convention", "ours": approx,
                        "backend": backend.__name__, "error": repr(err)[:200]}
            print(json.dumps(line), flush=True)
            lines.append(line)
    # ours against the exact GGN blocks of deep linear conv nets (Eschenhagen et al. 2023)

    class ChannelsLast(nn.Module):
        def forward(self, h):
            return h.movedim(1, -1)

    class MeanPositions(nn.Module):
        def forward(self, h):
            return h.mean((2, 3))

    settings = {
        "expand": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1),
                                 ChannelsLast()), (4, 4, 2)),
        "reduce": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1), MeanPositions(),
                                 nn.Linear(2, 2)), (2,)),
    }
    for setting, (net, out_shape) in settings.items():
        net = net.double()
        xs = torch.randn(8, 2, 4, 4, dtype=torch.float64)
        ys = torch.randn(8, *out_shape, dtype=torch.float64)
        exact = oracle.ggn(net, xs, ys, oracle.gaussian_nll(1.0))
        for approx in ("expand", "reduce"):
            la = marglik.Laplace(net, "regression", hessian_structure="kron", kfac_approx=approx)
            la.fit(DataLoader(TensorDataset(xs, ys), batch_size=3))
            errors, offset = [], 0
            for block in la.H.blocks:
                ref = exact[offset:offset + block.size, offset:offset + block.size]
                errors.append(rel_tensor(block.to_dense(), ref))
                offset += block.size
            line = {"kind": "conv_vs_brute_force", "setting": setting, "kfac_approx": approx,
                    "max_block_rel_error": float(f"{max(errors):.3g}")}
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


# ------------------------------------------------------------------------------- fit / epoch


def fit_ratio(args) -> list[dict]:
    """KFAC and diag fit cost over one training epoch, with ``benchmarks/fit.py``'s helpers."""
    x, y, _, _ = digits(args.tile)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    lines = []
    for name in ("mlp", "cnn"):
        model = MODELS[name]()
        t_epoch = fit_bench.median_time(lambda m=model: fit_bench.epoch(m, loader), args.repeats)
        for structure, approx in [("kron", "expand"), ("diag", "expand")] + (
            [("kron", "reduce")] if name == "cnn" else []
        ):
            def run(m=model, s=structure, a=approx):
                marglik.Laplace(m, "classification", hessian_structure=s, kfac_approx=a).fit(loader)

            t_fit = fit_bench.median_time(run, args.repeats)
            lines.append({"kind": "fit_over_epoch", "model": name, "structure": structure,
                          "kfac_approx": approx if structure == "kron" else None,
                          "n": len(x), "fit_s": round(t_fit, 4), "epoch_s": round(t_epoch, 4),
                          "fit_over_epoch": round(t_fit / t_epoch, 2)})
            print(json.dumps(lines[-1]), flush=True)
    return lines


# ------------------------------------------------------------------------------- scale: ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, h):
        out = torch.relu(self.bn1(self.conv1(h)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(h))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (CIFAR variant: 3×3 stem, no max-pool), plain torch."""

    def __init__(self, n_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        layers, c_in = [], w
        for c_out, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes))

    def forward(self, h):
        return self.head(self.layers(self.stem(h)))


def digits32(n: int, train_split: bool = True, tile: int = 1):
    """Digits upsampled to 3×32×32 (bilinear, grey copied into 3 channels)."""
    x, y, xt, yt = load_digits_split()
    x, y = (x, y) if train_split else (xt, yt)
    x, y = x.repeat(tile, 1, 1, 1)[:n], y.repeat(tile)[:n]
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), y


def scale_child(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ResNet18(width=args.width).eval().to(device)
    x, y = digits32(args.scale_n, tile=2)  # the loader stays on the CPU; fit moves batches
    xt = digits32(args.scale_test, train_split=False)[0].to(device)

    def synced(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    loader = DataLoader(TensorDataset(x, y), batch_size=args.scale_batch)
    la = marglik.Laplace(model, "classification", hessian_structure="kron")
    out = {"kind": "scale", "model": f"ResNet-18 (width {args.width})", "params": sum(
        p.numel() for p in model.parameters()), "input": "digits upsampled to 3x32x32",
        "weights": "random init (eval mode, BatchNorm running stats at init)",
        "n_fit": len(x), "fit_batch": args.scale_batch, "n_test": len(xt), "device": str(device)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_fit, _ = timed(synced(lambda: la.fit(loader)))
    out["warnings"] = sorted({str(w.message)[:120] for w in caught})
    out["fit_s"] = round(t_fit, 2)
    out["fit_s_per_1000"] = round(1000 * t_fit / len(x), 2)
    out["peak_rss_after_fit_mb"] = round(_status_kb("VmHWM") / 1024, 1)
    t_ev, _ = timed(synced(lambda: la.optimize_prior_precision(
        method="marglik", n_steps=N_EVIDENCE_STEPS)))
    out["evidence_100_steps_s_incl_eigh"] = round(t_ev, 2)
    out["prior_precision"] = round(float(la.prior_precision), 4)
    reset_peak()
    before = _status_kb("VmRSS")
    with torch.no_grad():
        t_pred, probs = timed(synced(lambda: la(xt, pred_type="glm", link_approx="probit")))
    out["predictive_s"] = round(t_pred, 2)
    out["predictive_s_per_1000"] = round(1000 * t_pred / len(xt), 2)
    out["predictive_peak_delta_mb"] = round((_status_kb("VmHWM") - before) / 1024, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["probs_finite"] = bool(torch.isfinite(probs).all())
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# ------------------------------------------------------------------------------- tables


def _fmt(v, unit: str = "") -> str:
    return "–" if v is None else f"{v:.3g}{unit}"


def markdown(paths: list[str]) -> str:
    """Markdown tables from the JSON lines of earlier runs (timing, memory, agreement, scale)."""
    rows = [json.loads(ln) for p in paths for ln in open(p) if ln.startswith("{")]
    out = []
    times = [r for r in rows if r["kind"] == "time"]
    if times:
        out += ["| case | params | step | laplace-torch | marglik | ratio | target | met? |",
                "|---|---|---|---|---|---|---|---|"]
        for r in times:
            lt = _fmt(r["laplace_torch_s"], " s")
            if r["laplace_torch_status"] != "ok":
                lt = r["laplace_torch_status"].replace("|", "/")
            met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
            out.append(f"| {r['case']} | {r['params']:,} | {r['step']} | {lt} | "
                       f"{_fmt(r['marglik_s'], ' s')} | {_fmt(r['ratio'])} | "
                       f"{'≤ ' + str(r['target']) if r['target'] else '–'} | {met} |")
    mems = [r for r in rows if r["kind"] == "memory"]
    if mems:
        out += ["", "| case | step | laplace-torch peak | marglik peak | ratio | target | met? |",
                "|---|---|---|---|---|---|---|"]
        for r in mems:
            met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lt = _fmt(r["laplace_torch_peak_delta_mb"], " MB")
            if r["laplace_torch"].get("status", "ok") != "ok":
                lt = r["laplace_torch"]["status"].replace("|", "/")
            out.append(f"| {r['case']} | {r['step']} | {lt} | "
                       f"{_fmt(r['marglik_peak_delta_mb'], ' MB')} | {_fmt(r['ratio'])} | "
                       f"{'≤ ' + str(r['target']) if r['target'] else '–'} | {met} |")
    agree = [r for r in rows if r["kind"] == "agreement_float64"]
    if agree:
        out += ["", "| case | params | prior δ | log Z marglik | log Z laplace-torch | rel. diff |"
                " ≤ 1e-4? |", "|---|---|---|---|---|---|---|"]
        for r in agree:
            lt = f"{r['laplace_torch']:.10g}" if r.get("laplace_torch") is not None else (
                r.get("error", "–"))
            ok = "–" if "within_1e_4" not in r else ("yes" if r["within_1e_4"] else "**no**")
            out.append(f"| {r['case']} | {r['params']:,} | {r['prior']} | {r['marglik']:.10g} "
                       f"| {lt} | {r.get('rel_diff', '–')} | {ok} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------- main


def environment() -> dict:
    import importlib.metadata as md

    info = {"kind": "environment", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": platform.python_version(), "torch": torch.__version__,
            "nproc": os.cpu_count(), "threads": torch.get_num_threads(),
            "mem_available_gb": round(mem_available_gb(), 1),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
            "cpu": platform.processor() or platform.machine()}
    for pkg in ("marglik", "laplace-torch", "curvlinops-for-pytorch"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES],
                        choices=[c.name for c in CASES])
    parser.add_argument("--steps", nargs="+", default=STEPS + LT_ONLY_STEPS,
                        choices=ALL_STEPS, help="timing: steps to run (fit always)")
    parser.add_argument("--memory", action="store_true", help="peak memory per step")
    parser.add_argument("--agreement", action="store_true", help="float64 agreement checks")
    parser.add_argument("--fit-ratio", action="store_true", help="fit cost / epoch cost")
    parser.add_argument("--scale", action="store_true", help="ResNet-18 KFAC (marglik only)")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--scale-n", type=int, default=1000)
    parser.add_argument("--scale-test", type=int, default=540)
    parser.add_argument("--scale-batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="device of the ResNet-18 scale run")
    parser.add_argument("--cap-gb", type=float, default=20.0,
                        help="address-space cap of guarded subprocesses (lowered to the "
                             "memory available minus 1 GB)")
    parser.add_argument("--time-limit", type=int, default=600,
                        help="seconds before a guarded subprocess is stopped")
    parser.add_argument("--slow", type=float, default=60.0,
                        help="steps slower than this (s) on their first run are not repeated")
    parser.add_argument("--folder", help="where trained weights are cached (default: temporary)")
    parser.add_argument("--table", nargs="+", metavar="JSONL",
                        help="print Markdown tables from the JSON lines of earlier runs")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown(args.table))
        return
    torch.set_num_threads(1)
    warm_up()
    if args.child:
        lib, case, step = args.child
        res = measure_in_child(lib, CASE_BY_NAME[case], step, args.folder, args.tile,
                               args.batch_size, args.save)
        print(json.dumps(res))
        return
    if args.scale_child:
        print(json.dumps(scale_child(args)))
        return
    args.cap_gb = min(args.cap_gb, max(1.0, mem_available_gb() - 1.0))
    print(json.dumps({**environment(), "cap_gb": round(args.cap_gb, 1),
                      "time_limit_s": args.time_limit, "repeats": args.repeats,
                      "tile": args.tile, "batch_size": args.batch_size}), flush=True)
    if args.agreement:
        agreement(args)
        return
    if args.fit_ratio:
        fit_ratio(args)
        return
    if args.scale:
        cap = int(args.cap_gb * 2**30)
        cmd = [sys.executable, os.path.abspath(__file__), "--scale-child", "--width",
               str(args.width), "--scale-n", str(args.scale_n), "--scale-test",
               str(args.scale_test), "--scale-batch", str(args.scale_batch),
               "--device", args.device]

        def cap_memory():  # CUDA reserves far more address space than it uses: no cap there
            if args.device == "cpu":
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit,
                                 preexec_fn=cap_memory)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if lines else json.dumps(
                {"kind": "scale", "status": "did not finish",
                 "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({"kind": "scale", "status": "did not finish (time limit)"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        for name in dict.fromkeys(CASE_BY_NAME[c].model for c in args.cases):
            trained_model(name, folder)  # train once, before any timing
        for name in args.cases:
            case = CASE_BY_NAME[name]
            lines = memory_case(case, args, folder) if args.memory else time_case(
                case, args, folder)
            for line in lines:
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
