"""Bayesian graph contrastive learning on a contextual SBM (JSON lines; issue 17, part A).

    python benchmarks/graph_contrastive.py [--seeds 0 1 2 3 4] [--epochs 300] [--out DIR]
        [--n-nodes 1000] [--n-classes 4] [--n-features 32] [--p-in 0.02] [--p-out 0.003]
        [--mean-distance 1.0] [--encoders deterministic variational variational-tempered]

Möllers, Immer, Isufi & Fortuin (AABI 2023), at CPU scale (marglik.variational.graph). Per
seed: one contextual SBM graph (the seed draws the graph, the initialisation, the augmentations
and the label splits); for each encoder a two-layer GCN (hidden 64, embedding 32, projection
head 32, ELU) trained full-batch by Adam (lr 0.01, ``--epochs`` steps) on GRACE's NT-Xent
(τ = 0.5, edge drop (0.2, 0.4), feature mask (0.3, 0.4)):

- ``deterministic``: point weights, weight decay 1e-5 (GRACE's objective);
- ``variational``: mean-field Gaussian graph layers, prior N(0, 1), σ₀ = 0.01, the ELBO with
  KL / N (β = 1), one MC sample per step;
- ``variational-tempered``: the same with β = 0.1.

Linear evaluation: L2-normalised frozen embeddings at the posterior mean, multinomial logistic
regression (λ = 0.01) on k = 1 / 5 / 20 random labelled nodes per class, tested on all others.
The variational encoders predict with the probe's probabilities averaged over 20 weight draws
(embeddings of θ_s ~ q). Uncertainty: the disagreement D_i (S = 10 weight draws, or 1 for the
deterministic encoder; M = 20 positives, each with edge drop 0.3 and feature mask 0.3) and,
as the reference, 1 − max-probability of the probe; AUROC of ranking the test errors above the
correct predictions, and the error rate in 5 equal-count bins of D_i.

Lines: ``{"kind": "accuracy", ...}`` per (seed, encoder, k) and ``{"kind": "bins", ...}``, one
``{"kind": "run", ...}`` per (seed, encoder) with its training time, and a final
``{"kind": "summary", ...}`` per (encoder, k) with means and standard deviations over seeds.
Plots go to ``--out`` (default ``marglik-out/graph-contrastive``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from provenance import commit  # benchmarks/provenance.py

from marglik.metrics import nll
from marglik.variational.graph import (
    GCNEncoder,
    binned_error_rate,
    contextual_sbm,
    disagreement,
    few_label_split,
    fit_linear_probe,
    misclassification_auroc,
    normalized_adjacency,
    positive_likelihoods,
    train_contrastive,
)

ENCODERS = {
    "deterministic": dict(variational=False, kl_weight=0.0, weight_decay=1e-5),
    "variational": dict(variational=True, kl_weight=1.0, weight_decay=0.0),
    "variational-tempered": dict(variational=True, kl_weight=0.1, weight_decay=0.0),
}
KS = (1, 5, 20)


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def run_encoder(name: str, data, seed: int, args) -> list[dict]:
    cfg = ENCODERS[name]
    torch.manual_seed(seed)
    enc = GCNEncoder(data.x.shape[1], 64, 32, variational=cfg["variational"])
    start = time.perf_counter()
    history = train_contrastive(enc, data.x, data.edge_index, epochs=args.epochs, lr=1e-2,
                                weight_decay=cfg["weight_decay"], seed=seed, tau=0.5,
                                kl_weight=max(cfg["kl_weight"], 0.0))
    train_s = time.perf_counter() - start
    n = data.x.shape[0]
    adj = normalized_adjacency(data.edge_index, n)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        h_mean = enc(data.x, adj)
        draws = ([enc.embed(data.x, adj, enc.sample_weights(g)) for _ in range(20)]
                 if cfg["variational"] else [h_mean])
        lik = positive_likelihoods(enc, data.x, data.edge_index, n_positives=20,
                                   n_weight_samples=10, tau=0.5, generator=g)
    dis = disagreement(lik)
    emit({"kind": "run", "seed": seed, "encoder": name, "train_s": round(train_s, 2),
          "final_elbo": history[-1], "kl": float(enc.kl().detach()),
          "mean_likelihood": float(lik.mean())})
    lines = []
    split_gen = torch.Generator().manual_seed(seed + 2000)
    splits = {k: few_label_split(data.y, k, split_gen) for k in KS}
    for k, (train, test) in splits.items():
        probe = fit_linear_probe(h_mean[train], data.y[train], data.n_classes)
        probs = torch.stack([probe.probs(h[test]) for h in draws]).mean(0)
        correct = probs.argmax(1) == data.y[test]
        line = {"kind": "accuracy", "seed": seed, "encoder": name, "k": k,
                "accuracy": float(correct.double().mean()),
                "nll": float(nll(probs, data.y[test])),
                "auroc_disagreement": float(misclassification_auroc(dis[test], correct)),
                "auroc_maxprob": float(misclassification_auroc(1 - probs.max(1).values,
                                                               correct))}
        emit(line)
        lines.append(line)
        u, err = binned_error_rate(dis[test], correct, n_bins=5)
        emit({"kind": "bins", "seed": seed, "encoder": name, "k": k,
              "disagreement": u.tolist(), "error_rate": err.tolist()})
        lines.append({"kind": "bins", "encoder": name, "k": k, "disagreement": u.tolist(),
                      "error_rate": err.tolist()})
    return lines


def summarise(lines: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(line["encoder"] for line in lines):
        for k in KS:
            rows = [r for r in lines if r["kind"] == "accuracy" and r["encoder"] == name
                    and r["k"] == k]
            s = {"kind": "summary", "encoder": name, "k": k, "n_seeds": len(rows)}
            for key in ("accuracy", "nll", "auroc_disagreement", "auroc_maxprob"):
                v = torch.tensor([r[key] for r in rows], dtype=torch.float64)
                s[key] = round(float(v.mean()), 4)
                s[key + "_std"] = round(float(v.std()), 4) if len(rows) > 1 else 0.0
            out.append(s)
    return out


def plot(lines: list[dict], summary: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in dict.fromkeys(s["encoder"] for s in summary):
        rows = [s for s in summary if s["encoder"] == name]
        axes[0].errorbar([r["k"] for r in rows], [r["accuracy"] for r in rows],
                         yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3,
                         label=name)
        bins = [b for b in lines if b["kind"] == "bins" and b["encoder"] == name
                and b["k"] == 5]
        u = torch.tensor([b["disagreement"] for b in bins]).mean(0)
        e = torch.tensor([b["error_rate"] for b in bins]).mean(0)
        axes[1].plot(u, e, marker="o", label=name)
    axes[0].set(xscale="log", xlabel="labels per class k", ylabel="test accuracy",
                title="linear evaluation (mean ± sd over seeds)")
    axes[1].set(xscale="log", xlabel="disagreement D (bin mean)", ylabel="error rate",
                title="error vs disagreement (k = 5, 5 bins)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "graph_contrastive.png"), dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--n-nodes", type=int, default=1000)
    parser.add_argument("--n-classes", type=int, default=4)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--p-in", type=float, default=0.02)
    parser.add_argument("--p-out", type=float, default=0.003)
    parser.add_argument("--mean-distance", type=float, default=1.0)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--out", default="marglik-out/graph-contrastive")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    emit({"kind": "setup", "commit": commit(), "load": os.getloadavg()[0],
          "torch": torch.__version__, **{k: v for k, v in vars(args).items()}})
    lines = []
    for seed in args.seeds:
        data = contextual_sbm(args.n_nodes, args.n_classes, args.n_features, args.p_in,
                              args.p_out, args.mean_distance, seed=seed, dtype=torch.float32)
        for name in args.encoders:
            lines += run_encoder(name, data, seed, args)
    summary = summarise(lines)
    for s in summary:
        emit(s)
    if not args.no_plot:
        plot(lines, summary, args.out)
    emit({"kind": "done", "load": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
