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


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A data root holding the generated toy dataset (both splits), made once per test session."""
    from regionspot.data.toy import ensure_toy

    root = tmp_path_factory.mktemp("datasets")
    ensure_toy(root, "train")
    ensure_toy(root, "val")
    return root


@pytest.fixture(scope="session")
def toy_shards(toy_root, tmp_path_factory):
    """Shard sets of the first 48 toy train and val images, tiny backbones, 3 shards each."""
    from regionspot.extract.config import ExtractConfig
    from regionspot.extract.runner import run_extract

    out = tmp_path_factory.mktemp("shards")
    sets = {}
    for name in ("toy", "toy_val"):
        cfg = ExtractConfig(dataset=name, data_root=toy_root, out=out / name, backbones="tiny", shard_size=16,
                            limit=48, gpus=0)
        sets[name] = run_extract(cfg)
    return sets
