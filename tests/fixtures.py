"""Fixtures shared by some test modules (imported there, so they apply to those modules only)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is about as fast, and far faster when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
