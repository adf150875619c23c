"""Fixtures shared across the test tree."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: tiny models on a shared 2-core machine run far
    faster without thread synchronisation. Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
