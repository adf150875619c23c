"""Fixtures shared across the test tree, and the hypothesis profile."""

import os

import pytest
import torch
from hypothesis import settings

# CI reproducibility: the same examples on every run, no per-example deadline (a shared 2-core
# machine has noisy timings). HYPOTHESIS_PROFILE=dev explores fresh random examples instead.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: tiny models on a shared 2-core machine run far
    faster without thread synchronisation. Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
