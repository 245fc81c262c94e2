"""Shared pytest setup: GPU tests skip cleanly without CUDA; every test starts from a known seed; the
``poison`` fixture makes every ``torch.empty`` allocation NaN-filled (``glmkit.testing.poisoned_allocations``)."""

from __future__ import annotations

import pytest
import torch

from glmkit.testing import poisoned_allocations


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs CUDA: run `pytest -m gpu` on a GPU machine (results in benchmarks/results/)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison():
    """Kernel outputs allocated in the test start as NaN, so an unwritten element fails the comparison."""
    with poisoned_allocations():
        yield
