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


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port with fault injection (tests/s3_server.py), once per session."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[test]')")
    from s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


def _bucket(server, monkeypatch, home):
    """A fresh, empty bucket on `server`, with the environment pointing S3 clients at it."""
    import uuid

    from s3_server import S3Bucket, create_bucket, s3_environment

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_environment(server.endpoint, home).items():
        monkeypatch.setenv(var, value)
    bucket = S3Bucket(server, f"test-{uuid.uuid4().hex[:12]}")
    create_bucket(server.endpoint, bucket.name)
    return bucket


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path_factory):
    """A fresh, empty bucket on the loopback S3 server (`s3.url` is `s3://NAME`); the environment, which
    subprocesses inherit, points S3 clients at the server. Faults injected by the test end with it."""
    yield _bucket(s3_server, monkeypatch, tmp_path_factory.mktemp("aws"))
    s3_server.faults.clear()


@pytest.fixture(scope="module")
def s3_module(s3_server, tmp_path_factory):
    """`s3` for a test module's shared shard sets: one bucket and environment for the whole module."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _bucket(s3_server, monkeypatch, tmp_path_factory.mktemp("aws"))
    s3_server.faults.clear()
