import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP barriers make
    # each small op wait for a time slice (a 1 ms forward becomes 1 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
