"""Shared fixtures. Stage-specific fixtures live in each stage's test module."""

import os

import pytest
import torch

# Two cores here and in CI: keep torch from oversubscribing when tests start subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
