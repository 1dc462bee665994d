"""Full-structure Laplace on a small transformer: GLM predictive time as a ratio to the fit (JSON).

    python benchmarks/transformer.py [--inputs 64] [--train 256]

A token classifier: Embedding(50, 32) → ``nn.TransformerEncoderLayer(32, 4, 64)`` (batch_first)
→ mean over 16 tokens → Linear(32, 4), about 9k parameters, float32, one thread, random tokens
and labels (the cost does not depend on the data). Fit: ``hessian_structure="full"`` over all
weights on ``--train`` sequences in batches of 32. Predictive: ``la(x)`` (GLM, probit) on
``--inputs`` sequences, default chunking; ``predictive_s`` is the first call (it factorises the
posterior precision), ``warm_predictive_s`` a second call on other inputs (the factor is cached).
The reference in the same run is the fit itself; the target of issue 11 is a predictive under
10× the fit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--train", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Tokens()
    ids, y = torch.randint(0, 50, (args.train, 16)), torch.randint(0, 4, (args.train,))
    loader = DataLoader(TensorDataset(ids, y), batch_size=32)
    start = time.perf_counter()
    la = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader)
    t_fit = time.perf_counter() - start
    x = torch.randint(0, 50, (args.inputs, 16))
    start = time.perf_counter()
    probs = la(x)
    t_pred = time.perf_counter() - start
    x2 = torch.randint(0, 50, (args.inputs, 16))
    start = time.perf_counter()
    la(x2)
    t_warm = time.perf_counter() - start
    print(json.dumps({
        "params": la.n_params, "train": args.train, "inputs": args.inputs,
        "fit_s": round(t_fit, 3), "predictive_s": round(t_pred, 3),
        "predictive_over_fit": round(t_pred / t_fit, 2), "warm_predictive_s": round(t_warm, 3),
        "warm_over_fit": round(t_warm / t_fit, 3), "probs_shape": list(probs.shape),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
