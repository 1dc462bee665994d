"""A small transformer sequence classifier with Laplace posteriors, from dict batches.

The data are made here (no downloads): sequences of 12 tokens from a vocabulary of 30; tokens
1–10 are "positive", 11–20 "negative", the rest neutral; the label says whether a sequence holds
more positive than negative tokens, with 10 % of the labels flipped. Sequences have random
lengths and are padded (token 0) with an ``attention_mask``, and the loader yields
HuggingFace-style dicts ``{"input_ids", "attention_mask", "labels"}``.

A one-layer transformer encoder (``nn.TransformerEncoderLayer``, masked mean pooling) is trained
to the MAP; then three Laplace posteriors are fitted on the same dict batches, each with its prior
precision tuned by the evidence:

- last layer, full GGN;
- LoRA-style: the base network frozen and a low-rank adapter on the head trained, the posterior
  over the trainable parameters (``subset_of_weights="all"`` = those with ``requires_grad``);
- all weights, KFAC (attention projections and feed-forward layers in Kronecker form over tokens).

Prints test accuracy, NLL and ECE of each against the MAP network.

    python examples/text_classifier.py
"""

import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

import marglik
from marglik import metrics
from marglik.training import train_map

torch.set_num_threads(1)  # small networks: one thread is fastest
warnings.filterwarnings("ignore", module="torch")  # torch's notes on its attention fast paths
torch.manual_seed(0)
VOCAB, LENGTH, D = 30, 12, 16


def make_data(n: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = ids * mask  # padding token 0
    positive = ((ids >= 1) & (ids <= 10)).sum(1)
    negative = ((ids >= 11) & (ids <= 20)).sum(1)
    labels = (positive > negative).long()
    flip = torch.rand(n, generator=generator) < 0.1  # 10 % label noise: calibration matters
    labels = torch.where(flip, 1 - labels, labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.encoder = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(D, 2)

    def features(self, batch: dict) -> torch.Tensor:
        mask = batch["attention_mask"]
        h = self.encoder(self.embed(batch["input_ids"]), src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)  # masked mean over tokens

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.features(batch))


class LoRAHead(nn.Module):
    """The frozen head plus a trainable rank-r update: W x + B A x."""

    def __init__(self, head: nn.Linear, rank: int = 2):
        super().__init__()
        self.head = head
        self.A = nn.Parameter(0.01 * torch.randn(rank, head.in_features))
        self.B = nn.Parameter(torch.zeros(head.out_features, rank))

    def forward(self, x):
        return self.head(x) + x @ self.A.T @ self.B.T


def batches(data: dict, size: int) -> list[dict]:
    n = len(data["labels"])
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def evaluate(name: str, probs: torch.Tensor, y: torch.Tensor, seconds: float) -> None:
    print(f"  {name:34s} acc {metrics.accuracy(probs, y).item():.3f}  "
          f"NLL {metrics.nll(probs, y).item():.3f}  ECE {metrics.ece(probs, y).item():.3f}  "
          f"{seconds:5.1f} s")


gen = torch.Generator().manual_seed(0)
train, test = make_data(800, gen), make_data(400, gen)
loader = DataLoader(batches(train, 50), batch_size=None)  # yields the dicts as they are
x_test = {k: v for k, v in test.items() if k != "labels"}
y_test = test["labels"]

model = Classifier()
start = time.perf_counter()
train_map(model, loader, "classification", n_epochs=40, lr=3e-3, prior_precision=1.0)
t_map = time.perf_counter() - start
print(f"transformer classifier: {sum(p.numel() for p in model.parameters())} parameters, "
      f"{len(train['labels'])} training / {len(y_test)} test sequences")
with torch.no_grad():
    evaluate("MAP", model(x_test).softmax(-1), y_test, t_map)

start = time.perf_counter()
la = marglik.Laplace(model, "classification", subset_of_weights="last_layer",
                     hessian_structure="full").fit(loader)
la.optimize_prior_precision(prior_structure="layerwise")
evaluate("Laplace last layer (full)", la(x_test), y_test, time.perf_counter() - start)

start = time.perf_counter()
la = marglik.Laplace(model, "classification", hessian_structure="kron").fit(loader)
la.optimize_prior_precision(prior_structure="layerwise")
evaluate("Laplace all weights (KFAC)", la(x_test), y_test, time.perf_counter() - start)

# LoRA-style: freeze the trained network, add a low-rank adapter on the head, train only it
start = time.perf_counter()
for p in model.parameters():
    p.requires_grad_(False)
model.head = LoRAHead(model.head)
train_map(model, loader, "classification", n_epochs=10, lr=3e-3, prior_precision=1.0)
with torch.no_grad():
    evaluate("MAP with the adapter", model(x_test).softmax(-1), y_test,
             time.perf_counter() - start)
la = marglik.Laplace(model, "classification", hessian_structure="full").fit(loader)  # "all"
la.optimize_prior_precision(prior_structure="layerwise")
print(f"  (LoRA posterior over {la.n_params} adapter parameters: {la.subset.names})")
evaluate("Laplace LoRA adapter (full)", la(x_test), y_test, time.perf_counter() - start)
