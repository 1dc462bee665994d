"""Sinusoid regression: post-hoc vs online evidence maximisation with a Laplace posterior.

Post-hoc: train the MAP with a fixed prior, then fit a KFAC Laplace and tune the prior precision
and the noise σ by the evidence. Online: tune them during training (marglik_training). Both GLM
predictives are plotted to regression_toy.png.

    python examples/regression_toy.py
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from marglik import Laplace  # noqa: E402
from marglik.plot import predictive_bands  # noqa: E402
from marglik.training import marglik_training, train_map  # noqa: E402

torch.set_num_threads(1)  # small networks: one thread is fastest
torch.manual_seed(0)
x = torch.cat([torch.rand(80, 1) * 3 - 4, torch.rand(80, 1) * 3 + 1])  # a gap in the middle
y = torch.sin(2 * x) + 0.2 * torch.randn_like(x)
loader = [(x, y)]  # one full batch
x_test = torch.linspace(-6, 6, 300).unsqueeze(-1)


def mlp():
    return nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))


# post-hoc: MAP with a fixed prior, then evidence for δ (layer-wise) and σ
model = mlp()
train_map(model, loader, "regression", n_epochs=600, lr=1e-2, prior_precision=1.0)
la_post = Laplace(model, "regression", hessian_structure="kron").fit(loader)
la_post.optimize_prior_precision(prior_structure="layerwise", tune_sigma=True)
print(f"post-hoc: log Z = {la_post.log_marginal_likelihood().item():.1f}, "
      f"σ = {la_post.sigma_noise.item():.3f}")

# online: δ and σ tuned every 25 epochs during training
la_on, _, _ = marglik_training(mlp(), loader, "regression", "kron", "layerwise", n_epochs=600,
                               lr=1e-2, n_epochs_burnin=50, marglik_frequency=25,
                               n_hypersteps=20)
print(f"online:   log Z = {la_on.log_marginal_likelihood().item():.1f}, "
      f"σ = {la_on.sigma_noise.item():.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, la, title in zip(axes, [la_post, la_on], ["post-hoc evidence", "online evidence"]):
    f_mean, f_var = la(x_test)
    predictive_bands(x_test, f_mean.squeeze(-1), f_var[:, 0, 0].sqrt(), x, y,
                     aleatoric_std=la.sigma_noise.item(), ax=ax)
    ax.set_title(title)
fig.tight_layout()
fig.savefig("regression_toy.png", dpi=120)
print("saved regression_toy.png")
