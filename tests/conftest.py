import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def float64_session():
    """float64 and one thread before any fixture: module- and session-scoped fixtures (trained
    models of the CLI and estimator tests) are set up before the per-test fixture below runs."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def single_thread_and_seed():
    """Single thread (small models run far faster so on 2 cores), float64, fixed seed."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
