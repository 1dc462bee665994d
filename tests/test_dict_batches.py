"""Dict and structured batches (``marglik.curvature.batches``), float64.

A tiny token model (Embedding → masked mean over tokens → Linear → tanh → Linear) is fitted from
loaders yielding ({"input_ids", "attention_mask"}, y) pairs, {"input_ids", "attention_mask",
"labels"} dicts, ``UserDict``s and (ids, mask) tuples, and compared with the same network
wrapped to take one tensor (ids and mask concatenated) and with per-sample brute force.
"""

from __future__ import annotations

import copy
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import marglik
from marglik.curvature.batches import (
    batch_size,
    call_model,
    slice_inputs,
    split_batch,
    to_model,
)
from marglik.curvature.per_sample import per_sample_column_grads
from marglik.curvature.subsets import select_subset
from marglik.predictive import predict
from marglik.training import marglik_training, select_architecture, train_map
from tests import oracle

VOCAB, T, C, N = 7, 4, 3, 10


class TokenNet(nn.Module):
    """Embedding → mean over the tokens where ``attention_mask`` is 1 → Linear → tanh → Linear."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 3)
        self.hidden = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, C)

    def features(self, ids, mask):
        m = mask.to(self.emb.weight.dtype).unsqueeze(-1)
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1)
        return self.out(torch.tanh(self.hidden(pooled)))

    def forward(self, batch):
        return self.features(batch["input_ids"], batch["attention_mask"])


class Concatenated(nn.Module):
    """The same network taking one tensor (B, 2T): ids and mask concatenated."""

    def __init__(self, net: TokenNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x[:, :T], x[:, T:])


class Positional(nn.Module):
    """The same network called as model(ids, mask)."""

    def __init__(self, net: TokenNet):
        super().__init__()
        self.net = net

    def forward(self, ids, mask):
        return self.net.features(ids, mask)


def make_data(n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    y = torch.randint(0, C, (n,), generator=g)
    return ids, mask, y


def loaders(ids, mask, y, batch: int = 4):
    """The same data as every kind of batch: name -> (list of batches, wrapper for the model)."""
    parts = [slice(i, i + batch) for i in range(0, ids.shape[0], batch)]
    return {
        "pair": ([({"input_ids": ids[s], "attention_mask": mask[s]}, y[s]) for s in parts], None),
        "dict": ([{"input_ids": ids[s], "attention_mask": mask[s], "labels": y[s]}
                  for s in parts], None),
        "userdict": ([UserDict(input_ids=ids[s], attention_mask=mask[s], labels=y[s])
                      for s in parts], None),
        "tuple": ([((ids[s], mask[s]), y[s]) for s in parts], Positional),
    }


def tensor_loader(ids, mask, y, batch: int = 4):
    X = torch.cat([ids, mask], 1)
    return [(X[i : i + batch], y[i : i + batch]) for i in range(0, ids.shape[0], batch)]


@pytest.fixture
def data():
    torch.manual_seed(0)
    net = TokenNet()
    ids, mask, y = make_data()
    return net, ids, mask, y


def wrap(net, wrapper):
    return net if wrapper is None else wrapper(net)


KINDS = ["pair", "dict", "userdict", "tuple"]


# ---------------------------------------------------------------------------------- batches
def test_split_batch_and_batch_size():
    ids, mask, y = make_data(5)
    x, t = split_batch({"input_ids": ids, "attention_mask": mask, "labels": y})
    assert t is y and set(x) == {"input_ids", "attention_mask", "labels"}
    assert batch_size(x) == 5
    x, t = split_batch(UserDict(input_ids=ids, labels=y))
    assert t is y and batch_size(x) == 5
    x, t = split_batch(((ids, mask), y))
    assert batch_size(x) == 5 and t is y
    assert batch_size({"a": ids, "b": {"c": mask}}) == 5
    sliced = slice_inputs({"a": ids, "b": (mask, torch.tensor(2.0))}, 1, 3)
    assert torch.equal(sliced["a"], ids[1:3]) and torch.equal(sliced["b"][0], mask[1:3])
    assert sliced["b"][1].ndim == 0


def test_to_model_casts_floats_only():
    model = nn.Linear(2, 1).to(torch.float32)
    x = to_model(UserDict(ids=torch.arange(3), f=torch.ones(3, 2, dtype=torch.float64)), model)
    assert type(x) is dict
    assert x["ids"].dtype == torch.int64 and x["f"].dtype == torch.float32
    assert call_model(lambda a, b: a + b, (torch.ones(1), torch.ones(1))).item() == 2


def test_missing_target_key_names_the_keys(data):
    net, ids, mask, y = data
    loader = [{"input_ids": ids, "attention_mask": mask, "target": y}]
    la = marglik.Laplace(net, "classification", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"dict_key_y='labels'.*'input_ids', 'attention_mask', "
                                         r"'target'"):
        la.fit(loader)
    # with the right key it works and gives the same curvature as with "labels"
    la_target = marglik.Laplace(net, "classification", hessian_structure="diag",
                                dict_key_y="target").fit(loader)
    la_labels = marglik.Laplace(net, "classification", hessian_structure="diag").fit(
        [{"input_ids": ids, "attention_mask": mask, "labels": y}])
    torch.testing.assert_close(la_target.H.to_dense(), la_labels.H.to_dense())
    with pytest.raises(ValueError, match="dict_key_y='labels'"):
        train_map(net, loader, "classification", n_epochs=1)


def test_mismatched_batch_sizes_are_named(data):
    net, ids, mask, y = data
    loader = [({"input_ids": ids, "attention_mask": mask[:-1]}, y)]
    la = marglik.Laplace(net, "classification", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"batch size 10.*x\['attention_mask'\] has 9"):
        la.fit(loader)
    la.fit([({"input_ids": ids, "attention_mask": mask}, y)])
    with pytest.raises(ValueError, match=r"batch size 10.*\['attention_mask'\] has 9"):
        la({"input_ids": ids, "attention_mask": mask[:-1]})
    with pytest.raises(ValueError, match="must yield"):
        la.fit([(ids, mask, y)])


def test_non_finite_inputs_in_a_dict(data):
    net, ids, mask, y = data
    la = marglik.Laplace(net, "classification", hessian_structure="diag")
    la.fit([({"input_ids": ids, "attention_mask": mask}, y)])
    bad = mask.double()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/inf.*attention_mask"):
        la({"input_ids": ids, "attention_mask": bad})


# ------------------------------------------------------------------------------- curvature
def test_per_sample_grads_with_dict_inputs_match_brute_force(data):
    net, ids, mask, y = data
    subset = select_subset(net, "all")
    U = torch.randn(2, N, C)
    G = per_sample_column_grads(net, subset, {"input_ids": ids, "attention_mask": mask}, U,
                                max_elements=3 * 2 * subset.size)  # chunks of 3 samples
    params = list(net.parameters())
    for n in range(N):
        f = net({"input_ids": ids[n : n + 1], "attention_mask": mask[n : n + 1]})
        for k in range(2):
            grads = torch.autograd.grad(f, params, U[k, n : n + 1], retain_graph=True)
            torch.testing.assert_close(G[k, n], torch.cat([g.reshape(-1) for g in grads]))


@pytest.mark.parametrize("kind", KINDS)
def test_full_curvature_matches_brute_force(data, kind):
    net, ids, mask, y = data
    batches, wrapper = loaders(ids, mask, y)[kind]
    la = marglik.Laplace(wrap(net, wrapper), "classification", hessian_structure="full")
    la.fit(batches)
    X = torch.cat([ids, mask], 1)

    def nll(f, t):
        return nn.functional.cross_entropy(f, t, reduction="sum")

    H = oracle.ggn(Concatenated(net), X, y, nll)
    torch.testing.assert_close(la.H.to_dense(), H)
    assert la.n_data == N


@pytest.mark.parametrize("structure", ["full", "diag", "kron", "lowrank"])
@pytest.mark.parametrize("kind", KINDS)
def test_curvature_and_evidence_match_the_tensor_model(data, kind, structure):
    net, ids, mask, y = data
    batches, wrapper = loaders(ids, mask, y)[kind]
    kw = dict(hessian_structure=structure, prior_precision=0.7, rank=5)
    with pytest.warns(UserWarning) if structure == "kron" else _nothing():
        la = marglik.Laplace(wrap(net, wrapper), "classification", **kw).fit(batches)
    with pytest.warns(UserWarning) if structure == "kron" else _nothing():
        ref = marglik.Laplace(Concatenated(net), "classification", **kw)
        ref.fit(tensor_loader(ids, mask, y))
    torch.testing.assert_close(la.H.to_dense(), ref.H.to_dense())
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    assert la.n_data == ref.n_data == N
    assert la.H.to_dense().abs().max() > 1e-3  # not trivially zero


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_last_layer_found_from_a_dict_batch(data):
    net, ids, mask, y = data
    batches, _ = loaders(ids, mask, y)["dict"]
    la = marglik.Laplace(net, "classification", subset_of_weights="last_layer",
                         hessian_structure="full").fit(batches)
    assert la.subset.names == ["out.weight", "out.bias"]
    ref = marglik.Laplace(Concatenated(net), "classification", subset_of_weights="last_layer",
                          hessian_structure="full").fit(tensor_loader(ids, mask, y))
    torch.testing.assert_close(la.H.to_dense(), ref.H.to_dense())


def test_a_dataloader_of_dicts(data):
    net, ids, mask, y = data

    class Tokens(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]}

    la = marglik.Laplace(net, "classification", hessian_structure="full")
    la.fit(DataLoader(Tokens(), batch_size=3))
    ref = marglik.Laplace(Concatenated(net), "classification", hessian_structure="full")
    ref.fit(tensor_loader(ids, mask, y))
    torch.testing.assert_close(la.H.to_dense(), ref.H.to_dense())


# ------------------------------------------------------------------------------- predictive
@pytest.mark.parametrize("backend", ["layerwise", "generic"])
@pytest.mark.parametrize("structure", ["kron", "full"])
@pytest.mark.parametrize("kind", ["pair", "dict", "tuple"])
def test_glm_predictive_with_dict_inputs(data, kind, structure, backend):
    net, ids, mask, y = data
    batches, wrapper = loaders(ids, mask, y)[kind]
    with pytest.warns(UserWarning) if structure == "kron" else _nothing():
        la = marglik.Laplace(wrap(net, wrapper), "classification",
                             hessian_structure=structure).fit(batches)
        ref = marglik.Laplace(Concatenated(net), "classification",
                              hessian_structure=structure).fit(tensor_loader(ids, mask, y))
    ids_t, mask_t, _ = make_data(7, seed=5)
    X = torch.cat([ids_t, mask_t], 1)
    x = (ids_t, mask_t) if kind == "tuple" else UserDict(input_ids=ids_t, attention_mask=mask_t)
    probs = predict(la, x, backend=backend, chunk_size=3)
    expected = predict(ref, X, backend=backend)
    torch.testing.assert_close(probs, expected)
    f, cov = la.functional_moments(x, joint=True, backend=backend)
    f_ref, cov_ref = ref.functional_moments(X, joint=True, backend=backend)
    torch.testing.assert_close(cov, cov_ref)
    torch.testing.assert_close(f, f_ref)
    assert cov.diagonal().min() > 0
    with torch.no_grad():
        logits = torch.softmax(net.features(ids_t, mask_t), -1)
    assert not torch.allclose(probs, logits, atol=1e-6)  # the variance matters


@pytest.mark.parametrize("kind", ["pair", "tuple"])
def test_nn_predictive_with_dict_inputs(data, kind):
    net, ids, mask, y = data
    batches, wrapper = loaders(ids, mask, y)[kind]
    la = marglik.Laplace(wrap(net, wrapper), "classification", hessian_structure="full")
    la.fit(batches)
    ref = marglik.Laplace(Concatenated(net), "classification", hessian_structure="full")
    ref.fit(tensor_loader(ids, mask, y))
    x = (ids, mask) if kind == "tuple" else {"input_ids": ids, "attention_mask": mask}
    p = la(x, pred_type="nn", n_samples=20, generator=torch.Generator().manual_seed(3),
           chunk_size=4)
    p_ref = ref(torch.cat([ids, mask], 1), pred_type="nn", n_samples=20,
                generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(p.sum(-1), torch.ones(N))


def test_regression_predictive_with_dict_inputs_and_pred_var(data):
    net, ids, mask, _ = data
    y = torch.randn(N, C)
    la = marglik.Laplace(net, "regression", hessian_structure="kron", sigma_noise=0.5)
    with pytest.warns(UserWarning):
        la.fit([{"input_ids": ids, "attention_mask": mask, "labels": y}])
    ref = marglik.Laplace(Concatenated(net), "regression", hessian_structure="kron",
                          sigma_noise=0.5)
    with pytest.warns(UserWarning):
        ref.fit(tensor_loader(ids, mask, y))
    x = {"input_ids": ids[:5], "attention_mask": mask[:5]}
    f, cov = la(x, joint=True, pred_var=True)
    f_ref, cov_ref = ref(torch.cat([ids, mask], 1)[:5], joint=True, pred_var=True)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(cov, cov_ref)
    assert cov.shape == (5 * C, 5 * C)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_train_map_matches_the_tensor_model(data, kind):
    net, ids, mask, y = data
    ref_net = copy.deepcopy(net)
    batches, wrapper = loaders(ids, mask, y)[kind]
    h = train_map(wrap(net, wrapper), batches, "classification", n_epochs=5, lr=0.05,
                  prior_precision=1.0)
    h_ref = train_map(Concatenated(ref_net), tensor_loader(ids, mask, y), "classification",
                      n_epochs=5, lr=0.05, prior_precision=1.0)
    assert h["loss"] == pytest.approx(h_ref["loss"], rel=1e-12)
    assert h["loss"][-1] < h["loss"][0]
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q)


def test_n_data_counts_dict_batches(data):
    from marglik.training.map import _n_data

    net, ids, mask, y = data
    for kind in KINDS:
        assert _n_data(loaders(ids, mask, y, batch=3)[kind][0]) == N
    loader = [{"ids": ids[:4], "mask": mask[:4], "labels": y[:4]}]
    assert _n_data(loader, dict_key_x="ids") == 4


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_marglik_training_matches_the_tensor_model(data, kind):
    net, ids, mask, y = data
    ref_net = copy.deepcopy(net)
    batches, wrapper = loaders(ids, mask, y)[kind]
    kw = dict(hessian_structure="full", n_epochs=3, n_hypersteps=5, lr=0.05, lr_hyp=0.1)
    torch.manual_seed(4)
    la, _, hist = marglik_training(wrap(net, wrapper), batches, "classification", **kw)
    torch.manual_seed(4)
    ref, _, hist_ref = marglik_training(Concatenated(ref_net), tensor_loader(ids, mask, y),
                                        "classification", **kw)
    assert hist["loss"] == pytest.approx(hist_ref["loss"], rel=1e-10)
    assert hist["log_marglik"] == pytest.approx(hist_ref["log_marglik"], rel=1e-10)
    delta = torch.tensor(hist["prior_precision"])
    delta_ref = torch.tensor(hist_ref["prior_precision"])
    torch.testing.assert_close(delta, delta_ref)
    assert (delta[-1] - delta[0]).abs().max() > 0.1  # the evidence moved the prior
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    assert la.dict_key_y == "labels"


def test_marglik_training_custom_keys_and_laplace_kwargs(data):
    net, ids, mask, y = data
    loader = [{"input_ids": ids, "attention_mask": mask, "target": y}]
    la, _, _ = marglik_training(net, loader, "classification", hessian_structure="diag",
                                n_epochs=1, n_hypersteps=1, dict_key_y="target")
    assert la.dict_key_y == "target" and la.n_data == N
    with pytest.raises(ValueError, match="not in laplace_kwargs"):
        marglik_training(net, loader, "classification", n_epochs=1,
                         laplace_kwargs={"dict_key_y": "target"})


def test_select_architecture_with_dict_batches(data):
    _, ids, mask, y = data
    batches, _ = loaders(ids, mask, y)["dict"]

    def candidates(wrapper):
        def make(hidden):
            def build():
                torch.manual_seed(hidden)
                return wrapper(TokenNet(hidden))
            return build
        return {"small": make(2), "large": make(6)}

    kw = dict(hessian_structure="diag", n_epochs=2, n_hypersteps=3, lr=0.05)
    best, scores = select_architecture(candidates(lambda m: m), batches, "classification", **kw)
    best_ref, scores_ref = select_architecture(candidates(Concatenated),
                                               tensor_loader(ids, mask, y), "classification",
                                               **kw)
    assert best == best_ref
    assert scores == pytest.approx(scores_ref, rel=1e-10)
    assert scores["small"] != pytest.approx(scores["large"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dict_batches_follow_the_model_to_cuda(data):
    net, ids, mask, y = data
    batches, _ = loaders(ids, mask, y)["dict"]  # on the CPU
    ref = marglik.Laplace(net, "classification", hessian_structure="full").fit(batches)
    la = marglik.Laplace(copy.deepcopy(net).cuda(), "classification", hessian_structure="full")
    la.fit(batches)
    torch.testing.assert_close(la.H.to_dense().cpu(), ref.H.to_dense())
    x = UserDict(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(la(x, chunk_size=3).cpu(), ref(x))
    torch.testing.assert_close(la.log_marginal_likelihood().cpu(), ref.log_marginal_likelihood())


def test_graph_paths_with_dict_inputs(data):
    """create_graph fits (per-sample autograd loop) and enable_backprop predictives."""
    net, ids, mask, y = data
    batches, _ = loaders(ids, mask, y)["pair"]
    la = marglik.Laplace(net, "classification", hessian_structure="full", prior_precision=0.5)
    la.fit(batches, create_graph=True)
    ref = marglik.Laplace(Concatenated(net), "classification", hessian_structure="full",
                          prior_precision=0.5)
    ref.fit(tensor_loader(ids, mask, y))
    torch.testing.assert_close(la.H.to_dense(), ref.H.to_dense())
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    x = {"input_ids": ids[:4], "attention_mask": mask[:4].double().requires_grad_()}
    for backend in ("generic", "layerwise"):
        p = predict(la, x, enable_backprop=True, backend=backend)
        p_ref = predict(ref, torch.cat([ids, mask], 1)[:4], backend=backend)
        torch.testing.assert_close(p.detach(), p_ref)
        (grad,) = torch.autograd.grad(p[:, 0].sum(), x["attention_mask"])
        assert grad.shape == (4, T) and grad.abs().sum() > 0


def test_n_data_counts_the_samples_of_a_loader_over_prebuilt_batches():
    """DataLoader(list_of_batches, batch_size=None) yields whole batches: count samples."""
    from marglik.training.map import _n_data

    ids = torch.randint(0, 5, (7, 3))
    batches = [{"input_ids": ids[:4], "labels": torch.zeros(4)},
               {"input_ids": ids[4:], "labels": torch.zeros(3)}]
    assert _n_data(DataLoader(batches, batch_size=None)) == 7
