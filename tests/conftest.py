"""Shared fixtures for the trp test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the setting afterwards.

    With two OpenMP threads on a loaded 2-core machine, MKL's SVD of a 64×576 matrix can take a
    whole second of spin-waiting instead of ~2 ms; one thread keeps the suite fast and deterministic.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
