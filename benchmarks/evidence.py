"""Cost of evidence steps (``optimize_prior_precision``) as a ratio to one epoch (JSON lines).

    python benchmarks/evidence.py [--repeats 3] [--steps 100]

sklearn digits (1,257 training images, float32, batch 128, one thread). Cases: the MLP
64-256-256-10 (85k parameters) with KFAC over all weights, and the MLP 64-32-32-10 (3,466
parameters) with the full GGN, each with a scalar and a layer-wise prior. The posterior is fitted
once; the time is for ``--steps`` Adam steps on the evidence (``--full-steps`` for the full GGN),
and for L-BFGS (``optimizer="lbfgs"``) to the optimum, the median of ``--repeats`` runs; each
line gives the evaluations made and the log evidence reached (Adam's gap to L-BFGS's is how far
its steps are from the optimum). The
reference in the same run is one epoch of Adam training of the same network on the same batches.
Only the public API is used, so the script also times earlier revisions (``PYTHONPATH=...``).
"""

from __future__ import annotations

import argparse
import json

import torch
from fit import epoch, median_time  # the same reference epoch and timer as benchmarks/fit.py
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.data import load_digits_split


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--full-steps", type=int, default=10,
                        help="steps for the full-GGN cases (a layer-wise δ costs a Cholesky each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = load_digits_split()
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    for hidden, structure in ((256, "kron"), (32, "full")):
        model = mlp(hidden)
        t_epoch = median_time(lambda model=model: epoch(model, loader), args.repeats)
        la = marglik.Laplace(model, "classification", hessian_structure=structure).fit(loader)
        for prior in ("scalar", "layerwise"):
            for optimizer in ("adam", "lbfgs"):
                n_steps = args.full_steps if structure == "full" else args.steps
                if optimizer == "lbfgs":
                    n_steps = 100  # the most evaluations; it stops at the optimum
                history = {}

                def steps(la=la, prior=prior, n_steps=n_steps, optimizer=optimizer,
                          history=history):
                    history.update(la.optimize_prior_precision(
                        method="marglik", prior_structure=prior, n_steps=n_steps,
                        init_prior_prec=1.0, optimizer=optimizer))

                t = median_time(steps, args.repeats)
                print(json.dumps({
                    "model": f"mlp-{hidden}", "params": la.n_params, "structure": structure,
                    "prior": prior, "optimizer": optimizer,
                    "evaluations": len(history["log_marglik"]), "steps_s": round(t, 4),
                    "epoch_s": round(t_epoch, 4), "steps_over_epoch": round(t / t_epoch, 2),
                    "log_marglik": round(la.log_marginal_likelihood().item(), 4),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                }), flush=True)


if __name__ == "__main__":
    main()
