"""Evidence-based probing (Immer et al., ACL 2022): which representation of the digits makes the
labels easiest to extract?

Four representations of 600 training digits — raw pixels, PCA-5, Gaussian noise and the raw
pixels with permuted labels (a control task) — are scored by the Laplace evidence of the best of
two probe families (linear and one-hidden-layer MLP, KFAC, layer-wise priors), each trained by
online evidence maximisation. The control and the noise should score lowest, near log p(y) of
predicting the class frequencies.

    python examples/evidence_probing.py
"""

import torch
from sklearn.decomposition import PCA

from marglik.applications.probing import probe_evidence
from marglik.data import load_digits_split

torch.set_num_threads(1)  # small probes: one thread is fastest
x, y, _, _ = load_digits_split(flatten=True)
x, y = x[:600], y[:600]
g = torch.Generator().manual_seed(0)
representations = {
    "raw pixels": (x, y),
    "PCA-5": (torch.as_tensor(PCA(5, random_state=0).fit_transform(x.numpy())), y),
    "Gaussian noise": (torch.randn(600, 64, generator=g), y),
    "random labels": (x, y[torch.randperm(600, generator=g)]),
}
counts = torch.bincount(y).double()
print(f"log p(y) of the class frequencies: {(counts * (counts / 600).log()).sum():.1f} nats")
for name, (features, labels) in representations.items():
    res = probe_evidence(features.float(), labels, ["linear-kron-layerwise", "mlp1-kron-layerwise"],
                         n_epochs=30, n_hypersteps=30, seed=0)
    scores = ", ".join(f"{k}: {v:.1f}" for k, v in res.log_evidence.items())
    print(f"{name:>15}: best {res.best} (log Z = {res.best_log_evidence:.1f}); {scores}")
