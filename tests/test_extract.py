"""The extraction stage: shards from the toy dataset with the tiny backbones."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from regionspot.errors import RegionSpotError
from regionspot.extract.config import ExtractConfig
from regionspot.extract.loop import shard_batches
from regionspot.extract.runner import run_extract
from regionspot.shards.identity import IDENTITY
from regionspot.shards.manifest import MANIFEST, is_finished
from regionspot.shards.shardset import ShardSet
from regionspot.shards.verify import verify_shardset
from regionspot.shards.writer import ShardSetWriter


def _cfg(root, out, **kw):
    base = dict(dataset="toy", data_root=root, out=out, backbones="tiny", shard_size=4, limit=12, gpus=0)
    return ExtractConfig(**{**base, **kw})


def _samples(path):
    return {s.key: s for s in ShardSet(path).iter_samples()}


def test_batches_never_span_shards():
    batches = shard_batches([0, 2], shard_size=5, num_images=12, batch_size=3)
    assert batches == [[0, 1, 2], [3, 4], [10, 11]]


def test_toy_shards_match_the_dataset(toy_shards, toy_root):
    from regionspot.data.datasets import open_dataset

    records = open_dataset("toy", toy_root).records()[:48]
    shards = ShardSet(toy_shards["toy"])
    assert shards.num_images == 48 and len(shards.shard_paths) == 3
    assert verify_shardset(toy_shards["toy"]) == []
    samples = list(shards.iter_samples())
    assert [s.key for s in samples] == [r.key for r in records]
    for s, r in zip(samples, records, strict=True):
        np.testing.assert_array_equal(s.boxes, r.boxes)
        np.testing.assert_array_equal(s.labels, r.labels)
        assert s.sam_tokens.shape == (len(r.boxes), 1, 256) and s.sam_tokens.dtype == np.float16
        assert np.isfinite(s.sam_tokens.astype(np.float32)).all()
    text = shards.text_embeddings()
    assert text.shape[0] == len(shards.vocabulary) == 10
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)


def test_wds_and_zarr_hold_identical_arrays(toy_root, tmp_path):
    wds = _samples(run_extract(_cfg(toy_root, tmp_path / "wds", storage="wds", sam_tokens=3)))
    zarr = _samples(run_extract(_cfg(toy_root, tmp_path / "zarr", storage="zarr", sam_tokens=3)))
    assert wds.keys() == zarr.keys() and len(wds) == 12
    for key, a in wds.items():
        for name, value in a.arrays().items():
            np.testing.assert_array_equal(value, getattr(zarr[key], name), err_msg=f"{key}.{name}")
        assert a.sam_tokens.shape[1] == 3


def test_a_different_run_is_refused_unless_overwrite(toy_root, tmp_path):
    run_extract(_cfg(toy_root, tmp_path / "s"))
    with pytest.raises(RegionSpotError, match="different run.*run.*--overwrite") as e:
        run_extract(_cfg(toy_root, tmp_path / "s", shard_size=6))
    assert f"run.shard_size differs: 6 here, 4 in {tmp_path / 's' / IDENTITY}" in str(e.value)
    with pytest.raises(RegionSpotError) as e:
        run_extract(_cfg(toy_root, tmp_path / "s", limit=5))
    assert f"(run.limit differs: 5 here, 12 in {tmp_path / 's' / IDENTITY});" in str(e.value)
    out = run_extract(_cfg(toy_root, tmp_path / "s", shard_size=6, overwrite=True))
    assert len(ShardSet(out).shard_paths) == 2


def test_two_cpu_workers_cover_every_image_once(toy_root, tmp_path):
    out = run_extract(_cfg(toy_root, tmp_path / "two", workers=2, shard_size=3))
    keys = [s.key for s in ShardSet(out).iter_samples()]
    from regionspot.data.datasets import open_dataset

    assert sorted(keys) == [r.key for r in open_dataset("toy", toy_root).records()[:12]]
    assert len(keys) == len(set(keys))


def test_corrupt_image_is_skipped_and_counted(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root / "toy", root / "toy")
    from regionspot.data.datasets import open_dataset

    victim = open_dataset("toy", root).records()[1]
    victim.path.write_bytes(b"not an image")
    out = run_extract(_cfg(root, tmp_path / "s"))
    manifest = ShardSet(out).manifest
    assert [s["key"] for s in manifest["dataset"]["skipped"]] == [victim.key]
    assert manifest["dataset"]["skipped"][0]["reason"]
    assert ShardSet(out).num_images == 11


def _extract_cmd(root, out):
    return [sys.executable, "-m", "regionspot.cli", "extract", "--dataset", "toy", "--data-root", str(root),
            "--out", str(out), "--backbones", "tiny", "--shard-size", "2", "--limit", "40", "--batch-size", "1",
            "--gpus", "0"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(toy_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_extract_cmd(toy_root, straight), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_extract_cmd(toy_root, resumed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    writer = ShardSetWriter(resumed, "wds")

    def done() -> int:
        return sum(writer.is_complete(i) for i in range(20))  # 40 images, 2 per shard

    deadline = time.time() + 120
    while done() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_finished(resumed), "the run finished before it could be killed"
    assert 3 <= done() < 20
    subprocess.run(_extract_cmd(toy_root, resumed), check=True, env=env, capture_output=True)

    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name
    assert json.loads((straight / MANIFEST).read_text()) == json.loads((resumed / MANIFEST).read_text())
