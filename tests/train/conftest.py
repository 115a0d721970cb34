"""Training tests run their in-process steps on one thread: on a shared 2-core machine, two OpenMP
threads spin-waiting for each other made a tiny model's step ~25x slower (measured 1.1 s vs 40 ms)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
