"""Data-parallel fit: 2 gloo ranks with half the data each give the single-process result."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marglik

STRUCTURES = ["full", "kron", "diag", "lowrank"]


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(24, 3, dtype=torch.float64)
    y = torch.randn(24, 2, dtype=torch.float64)
    return model, x, y


def fit(model, x, y, structure):
    la = marglik.Laplace(model, "regression", hessian_structure=structure, sigma_noise=0.5, rank=6)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=5))


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as in the parent (tests/conftest.py)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = problem()
        shard = slice(rank * 12, (rank + 1) * 12)
        result = {}
        for s in STRUCTURES:
            la = fit(model, x[shard], y[shard], s)
            result[s] = (la.H.to_dense(), la.log_marginal_likelihood().detach(), la.n_data)
        try:  # not distributed yet: a clear error, not rank-local rows
            fit(model, x[shard], y[shard], "kernel")
            result["kernel"] = "fitted"
        except ValueError as e:
            result["kernel"] = str(e)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    model, x, y = problem()
    assert "not available under torch.distributed" in result["kernel"]
    for s in STRUCTURES:
        la = fit(model, x, y, s)
        H, evidence, n = result[s]
        assert n == 24
        torch.testing.assert_close(H, la.H.to_dense(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            evidence, la.log_marginal_likelihood().detach(), rtol=1e-10, atol=1e-10
        )
