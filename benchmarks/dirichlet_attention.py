"""Dirichlet attention against softmax-attention baselines on a synthetic sequence task (JSON).

    python benchmarks/dirichlet_attention.py [--seeds 0 1 2] [--epochs 20] [--plots DIR]
        [--skip mc_dropout dirichlet dirichlet_kl0.1 ...]
    python benchmarks/dirichlet_attention.py --table results.jsonl   # Markdown, mean ± std

Task ("majority marker"): token 0 pads, tokens 1–4 are markers (the classes), 5–19 filler.
A sequence of length 10–16 holds 0–2 copies of each marker (at least one marker) and filler;
its label is the most frequent marker, ties broken uniformly at random (aleatoric noise: a tied
sequence has no better answer than 1/#tied). Train 3000, test 1000. OOD sets (1000 each): "unseen"
(same generator, filler drawn from tokens 20–29 never seen in training) and "long" (length 32–48,
in-vocabulary filler). Model: ``TransformerClassifier`` (E = 32, 4 heads, 2 blocks, learned
positions up to 48, masked mean pooling), Adam 3e-3, batch 64, ``--epochs`` epochs, float32,
one thread.

Methods, one JSON line per (seed, method): ``map`` (softmax attention), ``mc_dropout`` (dropout 0.1,
32 passes), ``laplace_last_layer`` and ``laplace_kron`` (``marglik.Laplace`` on the ``map`` net,
``subset_of_weights="last_layer"`` / all weights with ``hessian_structure="kron"``, prior
precision by ``optimize_prior_precision()``, GLM probit predictive; ``laplace_kron_at_weights``:
the same with ``method="marglik"``, the evidence at the network's weights, the default before
issue 18), ``dirichlet`` (Dirichlet
attention, ELBO with KL weight 1, prior Dir(1), MC predictive over 32 attention samples) and
``dirichlet_kl0.1`` (the same with KL weight 0.1). Metrics: test accuracy, NLL, ECE (15 bins),
OOD AUROC of the max probability for both OOD sets, and the seconds to train / fit.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import commit
from torch.utils.data import DataLoader, TensorDataset

import marglik
from marglik.metrics import accuracy, confidence, ece, nll, ood_auroc
from marglik.variational.attention import (
    TransformerClassifier,
    dirichlet_attention,
    elbo,
    predict_mc,
    softmax_attention,
)

VOCAB, CLASSES, MAX_LEN = 30, 4, 48


def make_set(n: int, g: torch.Generator, lengths=(10, 16), filler=(5, 20)) -> tuple:
    """``n`` sequences (padded with 0 to the longest length) and their majority-marker labels."""
    length = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
    counts = torch.randint(0, 3, (n, CLASSES), generator=g)
    empty = counts.sum(1) == 0
    counts[empty, torch.randint(0, CLASSES, (int(empty.sum()),), generator=g)] = 1
    top = counts == counts.max(1, keepdim=True).values
    y = torch.multinomial(top.float(), 1, generator=g).squeeze(1)  # uniform among the tied
    ids = torch.zeros(n, lengths[1], dtype=torch.long)
    body = torch.randint(filler[0], filler[1], (n, lengths[1]), generator=g)
    markers = torch.repeat_interleave(torch.arange(1, CLASSES + 1).repeat(n), counts.flatten())
    owner = torch.repeat_interleave(torch.arange(n), counts.sum(1))
    slot = torch.arange(markers.numel()) - torch.repeat_interleave(
        torch.cumsum(counts.sum(1), 0) - counts.sum(1), counts.sum(1))
    body[owner, slot] = markers
    # shuffle each sequence's first `length` tokens: sort random keys, real tokens first
    keys = torch.rand(n, lengths[1], generator=g) + (torch.arange(lengths[1]) >= length[:, None])
    perm = keys.argsort(1)
    shuffled = body.gather(1, perm)
    real = torch.arange(lengths[1]) < length[:, None]
    # the markers sit in slots < 8 ≤ length, so shuffling the real prefix keeps all of them
    ids[real] = shuffled[real]
    return ids, y


def train(model, x, y, epochs, seed, loss_fn):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            loss_fn(model, x[idx], y[idx]).backward()
            opt.step()
    return model.eval()


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


def scores(probs, y, ood):
    conf_in = confidence(probs["test"])
    out = {"accuracy": accuracy(probs["test"], y).item(), "nll": nll(probs["test"], y).item(),
           "ece": ece(probs["test"], y).item()}
    for name in ood:
        out[f"auroc_{name}"] = ood_auroc(conf_in, confidence(probs[name])).item()
    return out


def run_seed(seed: int, epochs: int, data: dict, plots: dict,
             skip: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    xtr, ytr = data["train"]
    inputs = {k: v[0] for k, v in data.items() if k != "train"}
    y = data["test"][1]

    def model(attention, dropout=0.0):
        torch.manual_seed(seed)
        return TransformerClassifier(VOCAB, CLASSES, MAX_LEN, dim=32, heads=4, depth=2,
                                     attention=attention, dropout=dropout)

    def record(method, probs, seconds, **extra):
        row = {"seed": seed, "method": method, **scores(probs, y, ["unseen", "long"]),
               "seconds": round(seconds, 1), **extra}
        rows.append(row)
        plots.setdefault(method, []).append({k: p for k, p in probs.items()})
        print(json.dumps(row), flush=True)

    start = time.perf_counter()
    net = train(model(softmax_attention()), xtr, ytr, epochs, seed, ce)
    t_map = time.perf_counter() - start
    with torch.no_grad():
        record("map", {k: net(v).softmax(-1) for k, v in inputs.items()}, t_map)

    if "mc_dropout" not in skip:
        start = time.perf_counter()
        drop = train(model(softmax_attention(dropout=0.1), dropout=0.1), xtr, ytr, epochs, seed,
                     ce)
        torch.manual_seed(seed)
        record("mc_dropout", {k: predict_mc(drop, v, 32, dropout=True) for k, v in inputs.items()},
               time.perf_counter() - start)

    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64)
    for method, kwargs, tune in [
            ("laplace_last_layer", {"subset_of_weights": "last_layer"}, {}),
            ("laplace_kron", {"subset_of_weights": "all"}, {}),
            ("laplace_kron_at_weights", {"subset_of_weights": "all"}, {"method": "marglik"})]:
        if method in skip:
            continue
        start = time.perf_counter()
        try:
            la = marglik.Laplace(net, "classification", hessian_structure="kron", **kwargs)
            la.fit(loader)
            la.optimize_prior_precision(**tune)
            with torch.no_grad():
                probs = {k: la(v, pred_type="glm", link_approx="probit") for k, v in inputs.items()}
            record(method, probs, t_map + time.perf_counter() - start,
                   prior_precision=la.prior_precision.flatten()[:1].item())
        except Exception as err:  # report the failure as a row, as the task asks
            row = {"seed": seed, "method": method, "error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)

    for method, weight in [("dirichlet", 1.0), ("dirichlet_kl0.1", 0.1)]:
        if method in skip:
            continue
        start = time.perf_counter()
        diri = train(model(dirichlet_attention(prior_concentration=1.0)), xtr, ytr, epochs, seed,
                     lambda m, xb, yb, w=weight: -elbo(m, xb, yb, kl_weight=w))
        torch.manual_seed(seed)
        probs = {k: predict_mc(diri, v, 32) for k, v in inputs.items()}
        with torch.no_grad():
            mean_acc = accuracy(diri(inputs["test"]).softmax(-1), y).item()
        record(method, probs, time.perf_counter() - start, mean_attention_accuracy=mean_acc)
    return rows


def save_plots(plots: dict, y_by_seed: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marglik.plot import reliability_diagram

    folder.mkdir(parents=True, exist_ok=True)
    methods = list(plots)
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.6), dpi=80)
    for ax, m in zip(axes, methods):
        probs = torch.cat([p["test"] for p in plots[m]])
        reliability_diagram(probs, torch.cat(y_by_seed), ax=ax)
        ax.set_title(m, fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "dirichlet-attention-reliability.png")
    fig, axes = plt.subplots(2, len(methods), figsize=(2.6 * len(methods), 4.4), dpi=80)
    for col, m in enumerate(methods):
        for row, ood in enumerate(["unseen", "long"]):
            ax = axes[row, col]
            for name in ["test", ood]:
                conf = torch.cat([confidence(p[name]) for p in plots[m]])
                ax.hist(conf.numpy(), bins=20, range=(0.25, 1), alpha=0.5, label=name)
            ax.set_title(f"{m}: test vs {ood}", fontsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "dirichlet-attention-ood.png")


def table(path: Path) -> None:
    """Print the Markdown table of mean ± standard deviation over seeds of a results file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "method" in r and "error" not in r]
    keys = ["accuracy", "nll", "ece", "auroc_unseen", "auroc_long", "seconds"]
    print("| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for method in dict.fromkeys(r["method"] for r in rows):
        vals = torch.tensor([[r[k] for k in keys] for r in rows if r["method"] == method])
        cells = [f"{m:.3f} ± {s:.3f}" if k != "seconds" else f"{m:.0f}"
                 for k, m, s in zip(keys, vals.mean(0), vals.std(0, unbiased=False))]
        print(f"| {method} ({len(vals)}) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--plots", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None)
    parser.add_argument("--skip", nargs="+", default=[], metavar="METHOD",
                        help="methods not to run (map always runs: the others start from it)")
    args = parser.parse_args()
    if args.table is not None:
        return table(args.table)
    torch.set_num_threads(1)
    print(json.dumps({"commit": commit(), "epochs": args.epochs, "seeds": args.seeds}), flush=True)
    plots: dict = {}
    ys = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        data = {"train": make_set(3000, g), "test": make_set(1000, g),
                "unseen": make_set(1000, g, filler=(20, 30)),
                "long": make_set(1000, g, lengths=(32, 48))}
        ys.append(data["test"][1])
        run_seed(seed, args.epochs, data, plots, tuple(args.skip))
    if args.plots is not None:
        save_plots(plots, ys, args.plots)


if __name__ == "__main__":
    main()
