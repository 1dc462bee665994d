"""Choosing an architecture by the evidence, on the training data alone.

Each candidate is trained with online evidence maximisation (marglik_training); the converged
Laplace log marginal likelihood ranks them (Immer et al., ICML 2021). On diabetes, a nearly
linear problem, the evidence prefers the linear model (log Z −341 vs −353 for tanh 10, measured
on 2026-11-26).

    python examples/architecture_selection.py
"""

import torch
from torch import nn

from marglik import select_architecture
from marglik.data import load_regression_set

torch.set_num_threads(1)  # small networks: one thread is fastest
torch.manual_seed(0)
data = load_regression_set("diabetes")  # sklearn's bundled set, standardised
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(data.X_train, data.y_train), batch_size=len(data.X_train)
)
d = data.X_train.shape[1]
candidates = {
    "linear": lambda: nn.Linear(d, 1),
    "tanh 10": lambda: nn.Sequential(nn.Linear(d, 10), nn.Tanh(), nn.Linear(10, 1)),
    "tanh 50": lambda: nn.Sequential(nn.Linear(d, 50), nn.Tanh(), nn.Linear(50, 1)),
    "tanh 50-50": lambda: nn.Sequential(
        nn.Linear(d, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)
    ),
}
best, scores = select_architecture(
    candidates, loader, "regression", n_epochs=300, lr=1e-2, marglik_frequency=20, n_hypersteps=50
)
for name, log_z in scores.items():
    print(f"{name:>11}: log Z = {log_z:8.1f}{'   <- chosen' if name == best else ''}")
