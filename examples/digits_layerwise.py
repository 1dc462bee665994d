"""Digits classification with layer-wise prior precisions learned by online evidence training.

Prints the test accuracy, NLL and ECE of the MAP (softmax of the network) and of the Laplace GLM
predictive (probit approximation).

    python examples/digits_layerwise.py
"""

import torch
from torch import nn

from marglik import metrics
from marglik.data import load_digits_split
from marglik.training import marglik_training

torch.set_num_threads(1)  # small networks: one thread is fastest
torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_digits_split(flatten=True)  # pixels already in [0, 1]
data = torch.utils.data.TensorDataset(x_train, y_train)
loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)

model = nn.Sequential(nn.Linear(64, 100), nn.GELU(), nn.Linear(100, 10))
la, model, history = marglik_training(model, loader, "classification", "kron", "layerwise",
                                      n_epochs=30, lr=1e-2, n_epochs_burnin=5,
                                      marglik_frequency=5, n_hypersteps=50)
print("layer-wise prior precisions:", [f"{d:.2f}" for d in la.prior_precision.tolist()])

with torch.no_grad():
    p_map = model(x_test).softmax(-1)
p_la = la(x_test, link_approx="probit")
for name, p in [("MAP", p_map), ("Laplace", p_la)]:
    print(f"{name:8s} acc {metrics.accuracy(p, y_test).item():.3f}  "
          f"NLL {metrics.nll(p, y_test).item():.3f}  ECE {metrics.ece(p, y_test).item():.3f}")
