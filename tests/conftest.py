import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread_and_seed():
    """Small models run far faster single-threaded on 2-core machines; fix the seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
