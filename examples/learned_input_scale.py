"""Learning input scales by the evidence: automatic relevance determination for an MLP.

An input layer x ↦ exp(log_scale) ⊙ x sits in front of a tanh network. Its log-scales are not
weights: they are registered as ``hyperparameters`` of ``marglik_training`` and learned with the
prior precision and the noise by the Laplace evidence, differentiated through both the data fit
and the KFAC curvature (Immer et al., ICML 2021; NeurIPS 2022). Under a scalar prior a larger
scale is a wider prior on that input's weights. On the toy below (y = sin 2x1 + 0.3 x2 + noise,
x3 irrelevant) the learned scales are x1 1.48, x2 0.05, x3 0.001, and against the same network
without the scale layer log Z rises from −27.7 to 104.2 and the test RMSE falls from 0.174 to
0.126 (noise 0.1; CPU, float32, about 25 s).

    python examples/learned_input_scale.py
"""

import torch
from torch import nn

from marglik import marglik_training


class InputScale(nn.Module):
    """x ↦ exp(log_scale) ⊙ x, one learned scale per input feature."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp()


def toy(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 acts non-linearly, x2 linearly and weakly, x3 not at all; noise 0.1."""
    x = torch.randn(n, 3)
    return x, torch.sin(2 * x[:, :1]) + 0.3 * x[:, 1:2] + 0.1 * torch.randn(n, 1)


torch.set_num_threads(1)  # small networks: one thread is fastest
torch.manual_seed(0)
x, y = toy(300)
x_test, y_test = toy(1000)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True
)
settings = dict(
    hessian_structure="kron",
    prior_structure="scalar",
    n_epochs=500,
    lr=1e-2,
    n_epochs_burnin=50,
    marglik_frequency=2,
)

for learned in (False, True):
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(3, 30), nn.Tanh(), nn.Linear(30, 1))
    scale = InputScale(3)
    model = nn.Sequential(scale, mlp) if learned else mlp
    la, model, _ = marglik_training(
        model,
        loader,
        "regression",
        # with hyperparameters in the forward pass: one step per update (see the docstring)
        n_hypersteps=1 if learned else 10,
        hyperparameters=[scale.log_scale] if learned else None,
        **settings,
    )
    with torch.no_grad():
        rmse = (model(x_test) - y_test).square().mean().sqrt().item()
    name = "learned input scales" if learned else "plain MLP"
    print(
        f"{name:>20}: log Z = {la.log_marginal_likelihood().item():6.1f}, "
        f"sigma = {la.sigma_noise.item():.3f}, test RMSE = {rmse:.3f}"
    )
    if learned:
        scales = ", ".join(f"x{i + 1}: {s:.3f}" for i, s in enumerate(scale.log_scale.exp()))
        print(f"{'':>20}  scales {scales}")
