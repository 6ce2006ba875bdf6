"""The shard contract (DESIGN.md §4): both storages, the set writer, identity, manifest, ShardSet, loader,
verify and the `shards` CLI."""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from regionspot.cli import app
from regionspot.errors import RegionSpotError
from regionspot.shards import loader
from regionspot.shards.identity import IDENTITY, Wanted, mismatch, read_identity, run_identity
from regionspot.shards.index import ShardFault
from regionspot.shards.loader import (
    Batch,
    SampleRef,
    assemble,
    batch_plan,
    collate,
    iter_batches,
    read_shard_samples,
)
from regionspot.shards.manifest import MANIFEST, TEXT_EMBEDDINGS, build_manifest, is_finished, read_manifest
from regionspot.shards.schema import ARRAY_FIELDS, SAM_DIM, SCHEMA_VERSION, Sample, record_name, shard_name
from regionspot.shards.shardset import ShardSet, check_mixable, find_shardsets
from regionspot.shards.storage import iter_shard, open_writer, read_shard, scan_index, shard_checksum
from regionspot.shards.verify import shardset_info, verify_shardset
from regionspot.shards.writer import ShardSetWriter, write_json_atomic

L, C = 5, 8
TEMPLATES = "unit templates"
TAR, ZARR = shard_name(0, "wds"), shard_name(0, "zarr")  # shard-000000.tar, shard-000000.zarr
TAR1 = shard_name(1, "wds")
VOCAB = [
    {"id": 1, "name": "cat", "synonyms": ["cat"], "frequency": "f"},
    {"id": 2, "name": "dog", "synonyms": ["dog"], "frequency": "c"},
    {"id": 3, "name": "sofa", "synonyms": ["sofa", "couch"], "frequency": "r"},
]


def make_sample(
    rng: np.random.Generator, key: str, n: int, t: int = 1, masks: bool = False, image_id=None
) -> Sample:
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(1, 50, (n, 2))
    return Sample(
        key=key,
        image_id=int(key) if image_id is None else image_id,
        file_name=f"{key}.jpg",
        width=int(rng.integers(64, 640)),
        height=int(rng.integers(64, 640)),
        boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
        labels=rng.integers(-1, len(VOCAB), n).astype(np.int32),
        scores=rng.uniform(0, 1, n).astype(np.float32),
        sam_tokens=rng.standard_normal((n, t, SAM_DIM)).astype(np.float16),
        sam_iou=rng.uniform(0, 1, (n, t)).astype(np.float16),
        clip_map=rng.standard_normal((L, C)).astype(np.float16),
        masks=[{"size": [32, 48], "counts": f"{i}a1b{key}"} for i in range(n)] if masks else None,
    )


def make_samples(
    seed: int = 0, counts=(3, 0, 5, 1, 0), t: int = 1, masks: bool = True, start: int = 0
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, f"{start + i:04d}", n, t, masks) for i, n in enumerate(counts)]


def write_shard(storage: str, path: Path, samples: list[Sample]) -> Path:
    writer = open_writer(storage, path)
    for s in samples:
        writer.write(s)
    writer.close()
    return path


def identity(storage: str, clip_model: str = "ViT-B-16", fingerprint: str = "f" * 64, limit=None, tokens: int = 1) -> dict:
    backbones = {
        "sam": {"model": "vit_b", "tokens": tokens},
        "clip": {"model": clip_model, "image_size": 224, "width": C, "embed_dim": 4, "logit_scale": 100.0},
        "fingerprint": fingerprint,
    }
    return run_identity(
        dataset="unit", sources={"annotations": "unit.json", "sha256": "0" * 64}, proposals={"source": "gt"},
        backbones=backbones, shard_size=4, limit=limit, masks=True, storage=storage,
    )  # fmt: skip


def text_embeddings(k: int = len(VOCAB), d: int = 4) -> np.ndarray:
    text = np.random.default_rng(0).standard_normal((k, d)).astype(np.float32)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


def build_set(out: Path, storage: str, shards: list[list[Sample]], **ident) -> Path:
    """A finished shard set, written through the writer `regionspot extract` uses."""
    writer = ShardSetWriter(out, storage)
    writer.claim(identity(storage, **ident))
    for i, samples in enumerate(shards):
        writer.write_shard(i, samples)
    assert writer.finish(len(shards), VOCAB, text_embeddings(), templates=TEMPLATES)
    return out


def assert_same(a: Sample, b: Sample) -> None:
    for name in ("key", "image_id", "file_name", "width", "height", "masks"):
        assert getattr(a, name) == getattr(b, name), name
    for name, (dtype, ndim) in ARRAY_FIELDS.items():
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == dtype and y.ndim == ndim, name
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def flip_byte(file: Path, at: float = 0.5) -> None:
    data = bytearray(file.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    file.write_bytes(bytes(data))


# --- storage round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["wds", "zarr"])
@pytest.mark.parametrize("t", [1, 3])
def test_round_trip(tmp_path, storage, t):
    samples = make_samples(t=t)
    path = write_shard(storage, tmp_path / shard_name(0, storage), samples)
    back = list(read_shard(path))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert_same(a, b)
        assert not b.problems()
    assert [s.num_regions for s in back] == [3, 0, 5, 1, 0]


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_round_trip_without_masks_and_string_ids(tmp_path, storage):
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, f"img{i}", n, image_id=f"img{i}") for i, n in enumerate((2, 0))]
    back = list(read_shard(write_shard(storage, tmp_path / shard_name(0, storage), samples)))
    for a, b in zip(samples, back, strict=True):
        assert_same(a, b)
        assert b.masks is None


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_round_trip_only_empty_images(tmp_path, storage):
    samples = make_samples(counts=(0, 0), t=3, masks=False)
    back = list(read_shard(write_shard(storage, tmp_path / shard_name(0, storage), samples)))
    for a, b in zip(samples, back, strict=True):
        assert_same(a, b)


def test_wds_and_zarr_agree(tmp_path):
    samples = make_samples(seed=3, t=3)
    wds = list(read_shard(write_shard("wds", tmp_path / TAR, samples)))
    zarr = list(read_shard(write_shard("zarr", tmp_path / ZARR, samples)))
    for a, b in zip(wds, zarr, strict=True):
        assert_same(a, b)


def test_tar_bytes_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shard("wds", tmp_path / "a" / TAR, make_samples())
    b = write_shard("wds", tmp_path / "b" / TAR, make_samples())
    assert a.read_bytes() == b.read_bytes()
    assert shard_checksum(a) == shard_checksum(b)
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert members[0].name == "0000.json" and members[1].name == "0000.boxes.npy"


def test_zarr_checksum_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shard("zarr", tmp_path / "a" / ZARR, make_samples(t=3))
    b = write_shard("zarr", tmp_path / "b" / ZARR, make_samples(t=3))
    sha, nbytes = shard_checksum(a)
    assert (sha, nbytes) == shard_checksum(b)
    assert nbytes == sum(f.stat().st_size for f in a.rglob("*") if f.is_file())
    c = write_shard("zarr", tmp_path / ZARR, make_samples(seed=9, t=3))
    assert shard_checksum(c)[0] != sha


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_abort_leaves_nothing(tmp_path, storage):
    writer = open_writer(storage, tmp_path / shard_name(0, storage))
    for s in make_samples():
        writer.write(s)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_unfinished_writer_has_no_final_name(tmp_path, storage):
    final = tmp_path / shard_name(0, storage)
    writer = open_writer(storage, final)
    writer.write(make_samples()[0])
    assert not final.exists()
    writer.close()
    assert final.exists() and [p.name for p in tmp_path.iterdir()] == [final.name]


def test_unknown_storage(tmp_path):
    with pytest.raises(RegionSpotError, match="unknown storage"):
        open_writer("hdf5", tmp_path / "x")
    with pytest.raises(RegionSpotError, match="not a shard"):
        read_shard(tmp_path / "shard-000000.h5")


# --- never unpickle ---------------------------------------------------------------------------------

UNPICKLED: list[str] = []


def _mark(tag):
    UNPICKLED.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_mark, ("payload",))


def test_wds_ignores_pickle_members(tmp_path):
    path = write_shard("wds", tmp_path / TAR, make_samples(counts=(2, 1)))
    with tarfile.open(path, "a") as tar:
        for name, data in (
            ("0001.evil.pyd", pickle.dumps(_Payload())),
            ("0001.evil.pth", pickle.dumps(_Payload())),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    UNPICKLED.clear()
    back = list(read_shard(path))
    assert [s.key for s in back] == ["0000", "0001"]
    assert UNPICKLED == []
    assert pickle.loads(pickle.dumps(_Payload())) == "payload" and UNPICKLED == [
        "payload"
    ]  # the payload is live


def test_wds_object_array_raises(tmp_path):
    sample = make_samples(counts=(2,))[0]
    path = tmp_path / TAR
    with tarfile.open(path, "w") as tar:
        members = {"json": json.dumps(sample.meta()).encode()}
        for name, array in sample.arrays().items():
            buf = io.BytesIO()
            if name == "boxes":
                np.save(buf, np.array([_Payload(), 1], dtype=object), allow_pickle=True)
            else:
                np.save(buf, array)
            members[f"{name}.npy"] = buf.getvalue()
        for rest, data in members.items():
            info = tarfile.TarInfo(f"{sample.key}.{rest}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    UNPICKLED.clear()
    with pytest.raises(RegionSpotError, match="sample 0000: boxes: holds Python objects"):
        list(read_shard(path))
    assert UNPICKLED == []


def test_wds_truncated_tar_raises(tmp_path):
    path = write_shard("wds", tmp_path / TAR, make_samples())
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(RegionSpotError):
        list(read_shard(path))


# --- manifest and ShardSet --------------------------------------------------------------------------


def test_manifest_and_shardset(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples(), make_samples(seed=1, counts=(4, 2), start=5)])
    m = read_manifest(out)
    assert m["dataset"]["images"] == 7 and m["dataset"]["regions"] == 15
    assert [s["name"] for s in m["shards"]] == [TAR, TAR1]
    ss = ShardSet(out)
    assert (ss.num_images, ss.num_regions, ss.name, ss.logit_scale) == (7, 15, "unit", 100.0)
    assert ss.text_embeddings().shape == (3, 4) and ss.text_embeddings().dtype == np.float32
    assert [s.key for s in ss.iter_samples()] == [f"{i:04d}" for i in range(7)]
    assert [s.key for s in ss.iter_samples([1])] == ["0005", "0006"]


def test_missing_dir(tmp_path):
    with pytest.raises(RegionSpotError, match="no shards in"):
        ShardSet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegionSpotError, match="no shards"):
        read_manifest(tmp_path / "empty")


def test_shards_without_manifest(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    (out / MANIFEST).unlink()
    with pytest.raises(RegionSpotError, match="run the same 'regionspot extract' command again"):
        ShardSet(out)


def test_wrong_version_and_format(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    m = json.loads((out / MANIFEST).read_text())
    write_json_atomic(out / MANIFEST, {**m, "version": 99})
    with pytest.raises(RegionSpotError, match="version 99"):
        ShardSet(out)
    write_json_atomic(out / MANIFEST, {**m, "format": "other"})
    with pytest.raises(RegionSpotError, match="not a regionspot shard manifest"):
        ShardSet(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(RegionSpotError, match="not valid JSON"):
        ShardSet(out)


def test_shardset_missing_shard(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples(), make_samples(start=5)])
    (out / TAR1).unlink()
    with pytest.raises(RegionSpotError, match=TAR1):
        ShardSet(out)


def test_shardset_bad_text_embeddings(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    np.save(out / TEXT_EMBEDDINGS, np.zeros((2, 4), np.float32))
    with pytest.raises(RegionSpotError, match="expected float32"):
        ShardSet(out).text_embeddings()


def test_check_fingerprint_names_field(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    ss = ShardSet(out)
    ss.check_fingerprint("f" * 64)  # same: passes
    other = identity("wds", clip_model="ViT-L-14", fingerprint="e" * 64)["backbones"]
    with pytest.raises(RegionSpotError) as e:
        ss.check_fingerprint(other["fingerprint"], against="the head", backbones=other)
    msg = str(e.value)
    assert "clip.model differs: ViT-B-16 vs ViT-L-14" in msg and "the head" in msg
    assert "sam.model" not in msg
    same = identity("wds", fingerprint="e" * 64)["backbones"]
    with pytest.raises(RegionSpotError, match="same models, different weights"):
        ss.check_fingerprint(same["fingerprint"], backbones=same)


# --- loader -----------------------------------------------------------------------------------------


def test_collate_padding(monkeypatch):
    """Padding is written, not assumed: the batch's memory starts as garbage."""
    allocate = loader._allocate

    def dirty(*args, **kwargs):
        tensors = allocate(*args, **kwargs)
        for t in tensors.values():
            t.fill_(True if t.dtype == torch.bool else 7)
        return tensors

    monkeypatch.setattr(loader, "_allocate", dirty)
    samples = make_samples(counts=(2, 0, 3), t=3)
    b = collate(samples)
    assert len(b) == 3 and b.keys == ["0000", "0001", "0002"]
    assert b.sam_tokens.shape == (3, 3, 3, SAM_DIM) and b.sam_tokens.dtype == torch.float16
    assert b.sam_iou.shape == (3, 3, 3) and b.clip_map.shape == (3, L, C)
    assert b.boxes.shape == (3, 3, 4) and b.scores.shape == (3, 3) and b.labels.dtype == torch.int64
    assert b.region_mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    pad = ~b.region_mask
    assert (b.labels[pad] == -1).all()
    for t in (b.sam_tokens, b.sam_iou, b.boxes, b.scores):
        assert (t[pad] == 0).all()
    for i, s in enumerate(samples):
        k = s.num_regions
        np.testing.assert_array_equal(b.sam_tokens[i, :k].numpy(), s.sam_tokens)
        np.testing.assert_array_equal(b.labels[i, :k].numpy(), s.labels)
        np.testing.assert_array_equal(b.boxes[i, :k].numpy(), s.boxes)
    np.testing.assert_array_equal(b.clip_map[1].numpy(), samples[1].clip_map)
    assert b.sizes == [(s.width, s.height) for s in samples]


def test_collate_no_regions():
    b = collate(make_samples(counts=(0, 0), t=3))
    assert b.sam_tokens.shape == (2, 0, 3, SAM_DIM)
    assert b.region_mask.shape == (2, 0) and b.labels.shape == (2, 0) and b.boxes.shape == (2, 0, 4)
    assert b.clip_map.shape == (2, L, C)


def test_batch_to_dtype():
    b = collate(make_samples(counts=(2, 1)))
    c = b.to("cpu", torch.float32)
    assert isinstance(c, Batch) and c.keys == b.keys
    assert c.sam_tokens.dtype == c.clip_map.dtype == c.sam_iou.dtype == c.boxes.dtype == torch.float32
    assert c.labels.dtype == torch.int64 and c.region_mask.dtype == torch.bool
    assert torch.equal(c.sam_tokens, b.sam_tokens.float())
    assert b.to("cpu").sam_tokens.dtype == torch.float16


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_iter_batches_order(tmp_path, storage):
    shards = [make_samples(counts=(1, 2, 0, 3, 1)), make_samples(seed=1, counts=(2, 0, 1), start=5)]
    out = build_set(tmp_path / "set", storage, shards)
    batches = list(iter_batches(ShardSet(out), batch_size=2))
    assert [b.keys for b, _ in batches] == [
        ["0000", "0001"],
        ["0002", "0003"],
        ["0004"],
        ["0005", "0006"],
        ["0007"],
    ]
    for b, samples in batches:
        assert b.keys == [s.key for s in samples]


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_iter_batches_workers(tmp_path, storage):
    shards = [make_samples(counts=(1, 2, 0, 3)), make_samples(seed=1, counts=(2, 0, 1, 1), start=4)]
    out = build_set(tmp_path / "set", storage, shards)
    ss = ShardSet(out)
    straight = [b.keys for b, _ in iter_batches(ss, batch_size=2)]
    assert straight == [["0000", "0001"], ["0002", "0003"], ["0004", "0005"], ["0006", "0007"]]
    assert [b.keys for b, _ in iter_batches(ss, batch_size=2, num_workers=2)] == straight
    # short batches at shard ends (a batch never spans two shards)
    odd = [b.keys for b, _ in iter_batches(ss, batch_size=3, num_workers=2)]
    assert odd == [["0000", "0001", "0002"], ["0003"], ["0004", "0005", "0006"], ["0007"]]
    three = [b.keys for b, _ in iter_batches(ss, batch_size=3)]
    assert three == odd


# --- verify and CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_verify(tmp_path, storage):
    out = build_set(tmp_path / "set", storage, [make_samples(), make_samples(seed=1, start=5)])
    assert verify_shardset(out) == []
    target = out / shard_name(1, storage)
    files = (
        [target]
        if target.is_file()
        else sorted((f for f in target.rglob("*") if f.is_file()), key=lambda f: -f.stat().st_size)
    )
    flip_byte(files[0])
    faults = verify_shardset(out)
    assert len(faults) == 1 and faults[0].startswith(f"{target.name}: checksum mismatch")


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_verify_missing_and_extra(tmp_path, storage):
    out = build_set(tmp_path / "set", storage, [make_samples(), make_samples(seed=1, start=5)])
    name = shard_name(0, storage)
    (out / name).rename(out / shard_name(7, storage))
    (out / TEXT_EMBEDDINGS).unlink()
    faults = verify_shardset(out)
    assert f"{name}: missing" in faults
    assert f"{shard_name(7, storage)}: not listed in the manifest" in faults
    assert f"{TEXT_EMBEDDINGS}: missing" in faults


def test_verify_count_mismatch(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    m = json.loads((out / MANIFEST).read_text())
    m["shards"][0]["regions"] += 1
    write_json_atomic(out / MANIFEST, m)
    assert any("manifest says 5 / 10" in f for f in verify_shardset(out))


def test_verify_no_manifest(tmp_path):
    assert "no shards in" in verify_shardset(tmp_path / "nope")[0]


def test_shardset_info(tmp_path):
    out = build_set(tmp_path / "set", "zarr", [make_samples(), make_samples(start=5)])
    info = shardset_info(out)
    assert (info["dataset"], info["storage"], info["shards"], info["images"], info["regions"]) == (
        "unit",
        "zarr",
        2,
        10,
        18,
    )
    assert info["vocabulary"] == 3 and info["sam"] == "vit_b (tokens 1)" and info["clip"] == "ViT-B-16 @224"
    assert info["format version"] == str(SCHEMA_VERSION)
    write_json_atomic(out / MANIFEST, {**read_manifest(out), "version": 2})  # an older set is described too
    assert shardset_info(out)["format version"] == f"2 (older; run 'regionspot shards reindex {out}')"


def test_cli_info_and_verify(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples(), make_samples(start=5)])
    runner = CliRunner()
    r = runner.invoke(app, ["shards", "info", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("unit", "wds", "images", "regions", "ViT-B-16", "vit_b"):
        assert text in r.output
    r = runner.invoke(app, ["shards", "verify", str(out)])
    assert r.exit_code == 0, r.output
    assert "ok: 2 shards, 10 images" in r.output
    flip_byte(out / TAR1)
    r = runner.invoke(app, ["shards", "verify", str(out)])
    assert r.exit_code == 1
    assert f"{TAR1}: checksum mismatch" in r.output
    r = runner.invoke(app, ["shards", "verify", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no shards in" in r.output


def test_cli_help():
    r = CliRunner().invoke(app, ["shards", "--help"])
    assert r.exit_code == 0 and "info" in r.output and "verify" in r.output
    r = CliRunner().invoke(app, ["shards", "verify", "--help"])
    assert r.exit_code == 0 and "manifest" in r.output


# --- offsets, writer checks, atomic replace ---------------------------------------------------------


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_read_from_offset(tmp_path, storage):
    samples = make_samples(counts=(3, 0, 5, 1, 0, 2), t=3)
    path = write_shard(storage, tmp_path / shard_name(0, storage), samples)
    for start, stop in ((0, None), (2, None), (2, 4), (5, None), (6, None), (9, None)):
        back = list(read_shard(path, start, stop))
        want = samples[start:stop]
        assert [s.key for s in back] == [s.key for s in want]
        for a, b in zip(want, back, strict=True):
            assert_same(a, b)
    assert [s.key for s in read_shard_samples(path, start=4)] == ["0004", "0005"]
    kept = [(i, s.key) for i, s in iter_shard(path, 1, keep=lambda i: i % 2 == 1)]
    assert kept == [(1, "0001"), (3, "0003"), (5, "0005")]


def test_wds_offset_skips_earlier_members_unread(tmp_path):
    path = write_shard("wds", tmp_path / TAR, make_samples(counts=(4, 2, 3)))
    with tarfile.open(path) as tar:
        member = tar.getmember("0000.clip_map.npy")
    data = bytearray(path.read_bytes())
    data[member.offset_data : member.offset_data + 8] = b"garbage!"  # breaks the .npy magic of sample 0
    path.write_bytes(bytes(data))
    with pytest.raises(RegionSpotError, match="sample 0000: clip_map: not a .npy array"):
        list(read_shard(path))
    assert [s.key for s in read_shard(path, start=1)] == ["0001", "0002"]


@pytest.mark.parametrize("key", ["x" * 180, "bild-ü-12"])
def test_wds_long_and_unicode_keys(tmp_path, key):
    rng = np.random.default_rng(4)
    samples = [make_sample(rng, key, 2, image_id=key), make_sample(rng, "b", 1, image_id="b")]
    a = write_shard("wds", tmp_path / TAR, samples)
    (tmp_path / "again").mkdir()
    b = write_shard("wds", tmp_path / "again" / TAR, samples)
    assert a.read_bytes() == b.read_bytes()
    for x, y in zip(samples, read_shard(a), strict=True):
        assert_same(x, y)


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_writer_refuses_bad_samples(tmp_path, storage):
    good = make_samples(counts=(2,))[0]
    cases = {
        "contains '.'": dict(key="a.b"),
        "sam_tokens is float32": dict(sam_tokens=good.sam_tokens.astype(np.float32)),
        "already written": dict(),
        "(T, L, C) = (3, 5, 8), the shard's first sample has (1, 5, 8)": dict(
            key="c", sam_tokens=np.zeros((2, 3, SAM_DIM), np.float16), sam_iou=np.zeros((2, 3), np.float16)
        ),
        "(T, L, C) = (1, 6, 8)": dict(key="d", clip_map=np.zeros((6, C), np.float16)),
        "3 rows, expected 2": dict(labels=np.zeros(3, np.int32)),
    }
    for message, change in cases.items():
        writer = open_writer(storage, tmp_path / shard_name(0, storage))
        writer.write(good)
        bad = Sample(**{**good.__dict__, **change})
        with pytest.raises(RegionSpotError, match=re.escape(message)):
            writer.write(bad)
        writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_writer_context_manager(tmp_path, storage):
    final = tmp_path / shard_name(0, storage)
    with pytest.raises(RuntimeError), open_writer(storage, final) as writer:
        writer.write(make_samples()[0])
        raise RuntimeError("killed mid-shard")
    assert list(tmp_path.iterdir()) == []
    with open_writer(storage, final) as writer:
        for s in make_samples():
            writer.write(s)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_writer_replaces_existing_shard(tmp_path, storage):
    final = tmp_path / shard_name(0, storage)
    write_shard(storage, final, make_samples(seed=1))
    write_shard(storage, final, make_samples(seed=2, counts=(1, 1)))
    assert [s.num_regions for s in read_shard(final)] == [1, 1]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


# --- manifest, fingerprints, mixing -----------------------------------------------------------------


def test_manifest_layout(tmp_path):
    out = build_set(tmp_path / "set", "zarr", [make_samples(), make_samples(start=5)])
    m = read_manifest(out)
    assert list(m) == [
        "format", "version", "storage", "dataset", "proposals", "vocabulary", "backbones", "run",
        "text_embeddings", "shards",
    ]  # fmt: skip
    assert m["storage"] == "zarr" and m["dataset"]["sources"]["annotations"] == "unit.json"
    assert m["text_embeddings"]["file"] == TEXT_EMBEDDINGS
    assert set(m["shards"][0]) == {"name", "samples", "regions", "bytes", "sha256"}


def test_build_manifest_needs_every_record():
    rec = {"name": TAR, "samples": 1, "regions": 1, "bytes": 1, "sha256": "0", "skipped": []}
    records = [{**rec, "index": 0}, {**rec, "index": 2}]
    with pytest.raises(RegionSpotError, match=r"missing \[1\]"):
        build_manifest(identity("wds"), records, VOCAB, templates=TEMPLATES)
    skipped = [{"key": "9", "reason": "cannot decode"}]
    m = build_manifest(identity("wds"), [{**rec, "index": 1, "skipped": skipped}, {**rec, "index": 0}], VOCAB,
                       {"dataset_stats": {"crowd_skipped": 2}, "proposals": {"source": "glip.json"}},
                       templates=TEMPLATES)  # fmt: skip
    assert m["dataset"]["skipped"] == skipped and m["dataset"]["stats"] == {"crowd_skipped": 2}
    assert m["proposals"] == {"source": "glip.json"} and m["dataset"]["images"] == 2


def test_malformed_manifest(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    m = json.loads((out / MANIFEST).read_text())
    del m["backbones"]
    write_json_atomic(out / MANIFEST, m)
    with pytest.raises(RegionSpotError, match="malformed manifest.*backbones"):
        ShardSet(out)


def test_fingerprint_from_sections_and_sets(tmp_path):
    a = ShardSet(build_set(tmp_path / "a", "wds", [make_samples()]))
    b = ShardSet(
        build_set(tmp_path / "b", "wds", [make_samples()], clip_model="ViT-L-14", fingerprint="e" * 64)
    )
    with pytest.raises(RegionSpotError, match="clip.model differs: ViT-B-16 vs ViT-L-14"):
        a.check_fingerprint(b.backbones, against="--init")
    with pytest.raises(
        RegionSpotError, match=f"other backbones than {re.escape(str(b.path))} .*clip.model differs"
    ):
        a.check_fingerprint(b)
    with pytest.raises(RegionSpotError, match="clip.model differs"):
        check_mixable([a, b])
    check_mixable([a, ShardSet(build_set(tmp_path / "c", "zarr", [make_samples()]))])  # same fingerprint
    other = identity("wds", fingerprint="d" * 64)["backbones"]
    other["clip"]["weights_sha256"], other["clip"]["pretrained"] = "1" * 64, "laion2b"
    with pytest.raises(RegionSpotError) as e:
        a.check_fingerprint(other)
    assert "clip.pretrained differs: None vs laion2b" in str(e.value) and "weights_sha256 differs" in str(
        e.value
    )


# --- loader details ---------------------------------------------------------------------------------


def test_collate_refuses_mixed_backbones():
    one, three = make_samples(counts=(1,), t=1)[0], make_samples(counts=(1,), t=3, start=1)[0]
    with pytest.raises(RegionSpotError, match="cannot batch sample '0001'"):
        collate([one, three])
    assert collate([]).sam_tokens.shape[0] == 0


def test_batch_to_keeps_boxes_precise():
    b = collate(make_samples(counts=(2, 1))).to("cpu", torch.bfloat16)
    assert b.sam_tokens.dtype == b.clip_map.dtype == b.sam_iou.dtype == torch.bfloat16
    assert b.boxes.dtype == b.scores.dtype == torch.float32


def test_batch_plan(tmp_path):
    out = build_set(
        tmp_path / "set", "wds", [make_samples(counts=(1, 2, 0)), make_samples(counts=(1,), start=3)]
    )
    assert batch_plan(ShardSet(out), 2) == [(0, 0, 2), (0, 2, 3), (1, 0, 1)]
    with pytest.raises(RegionSpotError, match="batch size 0"):
        batch_plan(ShardSet(out), 0)


# --- verify details ---------------------------------------------------------------------------------


def test_verify_content_faults(tmp_path):
    first, second = make_samples(), make_samples(seed=1, start=4)  # key 0004 in both shards
    first[2].labels[0] = len(VOCAB)  # outside the vocabulary
    out = build_set(tmp_path / "set", "wds", [first, second])
    record = json.loads((out / record_name(1)).read_text())
    write_json_atomic(out / record_name(1), {**record, "sha256": "0" * 64})
    text = np.load(out / TEXT_EMBEDDINGS)
    np.save(out / TEXT_EMBEDDINGS, text * 2)
    faults = verify_shardset(out)
    assert f"{TAR}: sample 0002: labels outside [-1, 3)" in faults
    assert f"{TAR1}: sample 0004: key also in {TAR}" in faults
    assert f"{record_name(1)}: sha256 differ from the manifest" in faults
    assert any(f.startswith(f"{TEXT_EMBEDDINGS}: rows are not L2-normalised") for f in faults)
    assert len(faults) == 4, faults


def test_verify_token_count_against_manifest(tmp_path):
    out = build_set(tmp_path / "set", "zarr", [make_samples(t=3, counts=(1, 0))])  # manifest says tokens 1
    assert verify_shardset(out) == [f"{ZARR}: sample 0000: 3 SAM tokens per region, manifest says 1",
                                    f"{ZARR}: sample 0001: 3 SAM tokens per region, manifest says 1"]  # fmt: skip


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_numpy_meta_and_bytes_rle(tmp_path, storage):
    sample = make_samples(counts=(2,))[0]
    sample.image_id, sample.width = np.int64(7), np.int32(33)
    sample.masks = [{"size": [4, 4], "counts": b"04L4"}, {"size": [4, 4], "counts": "1O"}]
    back = next(read_shard(write_shard(storage, tmp_path / shard_name(0, storage), [sample])))
    assert (back.image_id, back.width) == (7, 33) and type(back.image_id) is int
    assert back.masks == [{"size": [4, 4], "counts": "04L4"}, {"size": [4, 4], "counts": "1O"}]


def test_console_script_exit_codes(tmp_path, monkeypatch, capsys):
    from regionspot.cli import main

    out = build_set(tmp_path / "set", "wds", [make_samples()])
    (out / TAR).unlink()
    monkeypatch.setattr("sys.argv", ["regionspot", "shards", "verify", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1 and f"fault: {TAR}: missing" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["regionspot", "shards", "info", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: no shards in")


# --- the set writer: identity, claim, records, finish -----------------------------------------------


def test_file_names():
    """The names DESIGN.md §4 fixes; every other test takes them from these functions and constants."""
    assert (shard_name(12, "wds"), shard_name(12, "zarr"), record_name(12)) == (
        "shard-000012.tar", "shard-000012.zarr", "shard-000012.json",
    )  # fmt: skip
    assert (MANIFEST, IDENTITY, TEXT_EMBEDDINGS) == ("manifest.json", "identity.json", "text_embeddings.npy")


def test_claim_names_each_differing_field(tmp_path):
    out = tmp_path / "set"
    ShardSetWriter(out, "wds").claim(identity("wds", limit=3))
    assert read_identity(out) == identity("wds", limit=3)
    ShardSetWriter(out, "wds").claim(identity("wds", limit=3))  # the same run: let in
    same = identity("wds", limit=3)
    same["backbones"]["clip"]["mean"] = (0.5, 0.25)
    ShardSetWriter(tmp_path / "tuple", "wds").claim(same)
    ShardSetWriter(tmp_path / "tuple", "wds").claim(same)  # a tuple reads back as a list: the same run
    ran = identity("wds", limit=3)
    ran["backbones"]["runtime"] = {"precision": "fp16", "compile": True}  # how it ran: not what it computes
    ShardSetWriter(out, "wds").claim(ran)  # resumed in another precision: the same run
    with pytest.raises(RegionSpotError) as e:
        ShardSetWriter(out, "wds").claim(identity("wds", limit=5))
    msg = str(e.value)
    assert f"run.limit differs: 5 here, 3 in {out / IDENTITY}" in msg and "--overwrite" in msg
    assert "shard_size" not in msg and "backbones" not in msg
    with pytest.raises(RegionSpotError) as e:
        ShardSetWriter(out, "zarr").claim(identity("zarr", clip_model="ViT-L-14", limit=3))
    msg = str(e.value)
    assert f"backbones.clip.model differs: ViT-L-14 here, ViT-B-16 in {out / IDENTITY}" in msg
    assert f"storage differs: zarr here, wds in {out / IDENTITY}" in msg and "run." not in msg
    gone = identity("wds", limit=3)
    del gone["run"]["masks"]
    (out / IDENTITY).write_text(json.dumps(gone))
    with pytest.raises(RegionSpotError, match=re.escape("run.masks differs: True here, absent in")):
        ShardSetWriter(out, "wds").claim(identity("wds", limit=3))


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_writer_records_and_finish(tmp_path, storage):
    writer = ShardSetWriter(tmp_path / "set", storage)
    writer.claim(identity(storage))
    calls = []

    def text():
        calls.append(1)
        return text_embeddings()

    first = writer.write_shard(0, make_samples(), skipped=[("0009", "cannot decode")])
    layout, index = scan_index(writer.path / first["name"], checksums=True)  # the index as the bytes say
    assert first == {"index": 0, "name": shard_name(0, storage), "samples": 5, "regions": 9,
                     "bytes": shard_checksum(writer.path / first["name"])[1],
                     "sha256": shard_checksum(writer.path / first["name"])[0],
                     "skipped": [{"key": "0009", "reason": "cannot decode"}],
                     "layout": layout, "sample_index": index}  # fmt: skip
    assert layout == {"tokens": 1, "clip_map": [L, C]} and [e["regions"] for e in index] == [3, 0, 5, 1, 0]
    assert json.loads((writer.path / record_name(0)).read_text()) == first
    assert writer.is_complete(0) and not writer.is_complete(1)
    assert writer.records(2) is None
    assert not writer.finish(2, VOCAB, text, templates=TEMPLATES)  # shard 1 not done: nothing written
    assert calls == [] and not writer.finished and not is_finished(writer.path)
    with writer.open_shard(1) as shard:
        for s in make_samples(seed=1, counts=(2, 1), start=5):
            shard.write(s)
    summary = [{k: v for k, v in r.items() if k != "sample_index"} for r in (first, shard.record)]
    assert writer.records(2) == summary  # the index stays in the files
    assert writer.finish(2, VOCAB, text, templates=TEMPLATES) and calls == [1]
    assert not writer.finish(2, VOCAB, text, templates=TEMPLATES) and calls == [1]  # already finished
    ss = ShardSet(writer.path)
    assert (ss.num_images, ss.num_regions, ss.storage) == (7, 12, storage)
    assert ss.manifest["text_embeddings"] == {"file": TEXT_EMBEDDINGS, "templates": TEMPLATES}
    assert ss.manifest["dataset"]["skipped"] == [{"key": "0009", "reason": "cannot decode"}]
    np.testing.assert_array_equal(ss.text_embeddings(), text_embeddings())
    assert verify_shardset(writer.path) == []
    assert sorted(p.name for p in writer.path.iterdir()) == sorted(
        [IDENTITY, MANIFEST, TEXT_EMBEDDINGS, shard_name(0, storage), shard_name(1, storage),
         record_name(0), record_name(1)]
    )  # fmt: skip


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_open_shard_clears_stale_and_aborts_without_record(tmp_path, storage):
    writer = ShardSetWriter(tmp_path / "set", storage)
    writer.claim(identity(storage))
    stale = writer.path / f".{shard_name(0, storage)}.tmp-999999"  # what a killed writer left
    stale.mkdir() if storage == "zarr" else stale.write_bytes(b"half a shard")
    other = writer.path / f".{shard_name(1, storage)}.tmp-999999"
    other.write_bytes(b"another shard's")
    with pytest.raises(RuntimeError), writer.open_shard(0) as shard:
        assert not stale.exists() and other.exists()
        shard.write(make_samples()[0])
        raise RuntimeError("killed mid-shard")
    assert not writer.is_complete(0) and shard.record is None
    assert sorted(p.name for p in writer.path.iterdir()) == sorted([IDENTITY, other.name])


def test_finish_needs_the_identity(tmp_path):
    writer = ShardSetWriter(tmp_path / "set", "wds")
    writer.path.mkdir()
    writer.write_shard(0, make_samples())
    with pytest.raises(RegionSpotError, match=f"{IDENTITY} is missing"):
        writer.finish(1, VOCAB, text_embeddings(), templates=TEMPLATES)
    with pytest.raises(RegionSpotError, match="unknown storage 'hdf5'"):
        ShardSetWriter(tmp_path, "hdf5")


def test_clear_removes_only_the_sets_files(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples()])
    (out / f".{TAR1}.tmp-1").write_bytes(b"")
    (out / f".{MANIFEST}.tmp-1").write_text("{")
    (out / "notes.txt").write_text("mine")
    ShardSetWriter(out, "wds").clear()
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    ShardSetWriter(tmp_path / "nope", "wds").clear()  # nothing to clear


def test_write_json_atomic_is_strict_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": [1, 2.5, None]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RegionSpotError, match=f"cannot write {re.escape(str(path))}"):
            write_json_atomic(path, {"a": bad})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]}  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --- does a set fit a use: the wanted identity (moved from the evaluation tests) --------------------

FIT_MANIFEST = {
    "dataset": {"name": "lvis_val", "sources": {"annotations": "lvis/lvis_v1_val.json", "sha256": "aaa"}},
    "proposals": {"source": "gt"},
    "backbones": {"fingerprint": "f" * 64},
    "run": {"shard_size": 1000, "limit": None, "max_boxes": None, "masks": False},
}
WANT = Wanted("lvis_val", "aaa", None, "f" * 64, masks=False, limit=None)


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"dataset": {"name": "coco", "sources": {"sha256": "aaa"}}}, "dataset is 'coco'"),
        ({"dataset": {"name": "lvis_val", "sources": {"sha256": "bbb"}}}, "annotation file differs"),
        ({"proposals": {"source": "glip.json", "sha256": "ccc"}}, "not the annotated boxes"),
        ({"backbones": {"fingerprint": "e" * 64}}, "fingerprint"),
        ({"run": {"limit": 10, "max_boxes": None, "masks": False}}, "--limit 10"),
        ({"run": {"limit": None, "max_boxes": 50, "masks": False}}, "--max-boxes 50"),
    ],
)
def test_mismatch_names_the_field(change, phrase):
    assert mismatch(FIT_MANIFEST, WANT) is None
    assert phrase in mismatch({**FIT_MANIFEST, **change}, WANT)


def test_mismatch_masks_proposals_and_limits():
    assert "without --masks" in mismatch(
        FIT_MANIFEST, Wanted("lvis_val", "aaa", None, None, masks=True, limit=None)
    )
    glip = {**FIT_MANIFEST, "proposals": {"source": "glip.json", "sha256": "ccc"}}
    assert mismatch(glip, Wanted("lvis_val", "aaa", "ccc", None, False, None)) is None
    assert "sha256 differs" in mismatch(glip, Wanted("lvis_val", "aaa", "ddd", None, False, None))
    limited = {**FIT_MANIFEST, "run": {**FIT_MANIFEST["run"], "limit": 100}}
    assert mismatch(limited, Wanted("lvis_val", "aaa", None, None, False, limit=50)) is None


def test_shardset_fits_and_find(tmp_path):
    out = build_set(tmp_path / "root" / "unit", "wds", [make_samples()])
    nested = build_set(tmp_path / "root" / "by-backbone" / "unit-l", "wds", [make_samples()],
                       clip_model="ViT-L-14", fingerprint="e" * 64)  # fmt: skip
    ShardSetWriter(tmp_path / "root" / "unfinished", "wds").claim(identity("wds"))
    assert find_shardsets(tmp_path / "root") == [nested, out]
    assert find_shardsets(tmp_path / "nope") == []
    want = Wanted("unit", "0" * 64, None, "f" * 64, masks=True, limit=None)
    assert ShardSet(out).mismatch(want) is None
    assert "fingerprint" in ShardSet(nested).mismatch(want)
    assert ShardSet(out).mismatch(Wanted("unit", None, None, None, masks=True, limit=5)) is None
    assert mismatch(read_identity(tmp_path / "root" / "unfinished"), want) is None
    assert not is_finished(tmp_path / "root" / "unfinished") and is_finished(out)


# --- the per-sample index (format version 3) ---------------------------------------------------------


def _record(out: Path, index: int = 0) -> dict:
    return json.loads((out / record_name(index)).read_text())


def _member(out: Path, shard: int, sample: int, field: str) -> tuple[int, int]:
    """(offset in the tar, size) of a sample's member data, from the record's index."""
    entry = _record(out, shard)["sample_index"][sample]
    rel, size = entry["members"][("json", *ARRAY_FIELDS).index(field)]
    return entry["offset"] + rel, size


@pytest.fixture(params=["planned", "general"])
def scatter(request, monkeypatch):
    """Both ways a wds sample is read: by its layout's plan (straight into the batch, the headers compared
    in one go) or by the general read (every header parsed; a sample not written as planned, a bare shard)."""
    if request.param == "general":
        monkeypatch.setattr("regionspot.shards.wds.WdsReader._plan", lambda self, e, into: None)
    return request.param


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_index_round_trip(tmp_path, storage, scatter):
    """The writer's index is what the shard's bytes say; reads through it give back the written samples,
    one by one and straight into a batch (as collate pads them), also with a region subset and labels."""
    shards = [make_samples(), make_samples(seed=1, counts=(2, 4), start=5)]
    out = build_set(tmp_path / "set", storage, shards)
    for i in range(2):
        record = _record(out, i)
        assert (record["layout"], record["sample_index"]) == scan_index(out / shard_name(i, storage), checksums=True)
        assert [e["key"] for e in record["sample_index"]] == [s.key for s in shards[i]]
        assert [e["regions"] for e in record["sample_index"]] == [s.num_regions for s in shards[i]]
    ss = ShardSet(out)
    for a, b in zip(shards[0] + shards[1], ss.iter_samples(), strict=True):
        assert_same(a, b)
    refs = [SampleRef(ss.reader(0), k) for k in range(5)]
    batch, samples = assemble(refs)
    want = collate(shards[0])
    for name in ("sam_tokens", "sam_iou", "clip_map", "region_mask", "labels", "boxes", "scores"):
        assert torch.equal(getattr(batch, name), getattr(want, name)), name
    assert batch.keys == want.keys and batch.sizes == want.sizes
    for a, b in zip(shards[0], samples, strict=True):
        assert_same(a, b)
    kept, rows = shards[1][1], np.array([0, 2])  # a region subset (a region cap), with replaced labels
    labels = np.array([2, 1, 0, 1], np.int32)
    batch, (sample, _) = assemble([SampleRef(ss.reader(1), 1, labels=labels, rows=rows), SampleRef(ss.reader(1), 0)])
    assert batch.region_mask[0].tolist() == [True, True] and batch.labels[0].tolist() == [2, 0]
    np.testing.assert_array_equal(batch.sam_tokens[0].numpy(), kept.sam_tokens[rows])
    np.testing.assert_array_equal(batch.boxes[0].numpy(), kept.boxes[rows])
    np.testing.assert_array_equal(sample.boxes, kept.boxes[rows])
    assert sample.masks == [kept.masks[0], kept.masks[2]]


@pytest.mark.parametrize("tokens", [1, 3])
def test_every_sample_regionspot_writes_is_read_by_its_plan(tmp_path, monkeypatch, tokens):
    """Reads into a batch never need the general read for shards this version writes (zero regions, masks
    and three tokens included): the plan's headers are np.save's."""
    samples = make_samples(t=tokens)
    out = build_set(tmp_path / "set", "wds", [samples], tokens=tokens)
    monkeypatch.setattr("regionspot.shards.wds.WdsReader._decode", lambda *a, **k: pytest.fail("general read"))
    batch, read = assemble([SampleRef(ShardSet(out).reader(0), k) for k in range(len(samples))])
    want = collate(samples)
    for name in ("sam_tokens", "sam_iou", "clip_map", "region_mask", "labels", "boxes", "scores"):
        assert torch.equal(getattr(batch, name), getattr(want, name)), name
    for a, b in zip(samples, read, strict=True):
        assert_same(a, b)


def test_reads_stop_at_each_fault_naming_shard_and_sample(tmp_path, scatter):
    samples = make_samples(counts=(3, 2, 4, 1), masks=False)
    out = build_set(tmp_path / "set", "wds", [samples])
    tar, data = out / TAR, (out / TAR).read_bytes()

    def fault(match: str, verify: bool = True) -> None:
        with pytest.raises(ShardFault, match=match) as e:
            ss = ShardSet(out)
            for k in range(4):
                assemble([SampleRef(ss.reader(0), k)], verify=verify)
        assert e.value.shard == str(tar) and f"regionspot shards verify {out}" in str(e.value)
        assert "\n" not in str(e.value)
        tar.write_bytes(data)

    entry = _record(out)["sample_index"][2]
    tar.write_bytes(data[: entry["offset"]])  # truncated where sample 0002 starts
    fault("sample 0002: the shard ends at byte .* it is truncated")
    offset, size = _member(out, 0, 1, "clip_map")
    flipped = bytearray(data)
    flipped[offset + size - 3] ^= 0x10  # one bit of a feature
    tar.write_bytes(bytes(flipped))
    fault("sample 0001: checksum mismatch")
    tar.write_bytes(bytes(flipped))
    ss = ShardSet(out)
    with pytest.raises(RegionSpotError, match="sample 0001: checksum mismatch"):  # evaluation reads verify
        list(iter_batches(ss, 4))
    batch, _ = assemble([SampleRef(ss.reader(0), 1)], verify=False)  # without the checksum, it reads
    assert not np.array_equal(batch.clip_map[0].numpy(), samples[1].clip_map)
    tar.write_bytes(data)
    offset, size = _member(out, 0, 2, "sam_tokens")
    header = bytearray(data)
    at = data.index(b"(4, 1, 256)", offset, offset + size)
    header[at : at + 11] = b"(4, 1, 255)"  # the .npy shape header changed, same length
    tar.write_bytes(bytes(header))
    fault("sample 0002: checksum mismatch")
    tar.write_bytes(bytes(header))
    fault(re.escape("sample 0002: sam_tokens is float16[4, 1, 255], expected float16[4, 1, 256]"), verify=False)


def test_a_label_outside_the_vocabulary_stops_reads(tmp_path):
    samples = make_samples(counts=(2, 3), masks=False)
    samples[1].labels[1] = 99
    ss = ShardSet(build_set(tmp_path / "set", "zarr", [samples]))
    for verify in (True, False):  # the checksum is right: the label is what was extracted
        with pytest.raises(ShardFault, match=re.escape("sample 0001: label 99 is outside the vocabulary [-1, 3)")):
            assemble([SampleRef(ss.reader(0), k) for k in range(2)], verify=verify)


def test_zarr_reads_check_their_arrays(tmp_path):
    out = build_set(tmp_path / "set", "zarr", [make_samples(counts=(2, 3))])
    record = _record(out)
    record["sample_index"][1]["xxh3"] ^= 1
    write_json_atomic(out / record_name(0), record)
    with pytest.raises(ShardFault, match="sample 0001: checksum mismatch"):
        list(ShardSet(out).iter_samples())
    record["sample_index"][1]["xxh3"] ^= 1
    record["sample_index"][1]["rows"] = [3, 5]
    write_json_atomic(out / record_name(0), record)
    with pytest.raises(ShardFault, match=re.escape("sample 0001: its region rows are [2, 5], the index says [3, 5]")):
        ShardSet(out).reader(0).read(0)


def test_eval_batches_with_workers_stop_with_one_line(tmp_path):
    out = build_set(tmp_path / "set", "wds", [make_samples(counts=(1, 2)), make_samples(counts=(2, 1), start=2)])
    offset, size = _member(out, 1, 1, "sam_tokens")
    flip_byte_at(out / TAR1, offset + size - 1)
    with pytest.raises(RegionSpotError) as e:
        list(iter_batches(ShardSet(out), batch_size=2, num_workers=2))
    assert str(e.value).startswith(f"{out / TAR1}: sample 0003: checksum mismatch") and "\n" not in str(e.value)


def flip_byte_at(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_verify_checks_the_index(tmp_path, storage):
    out = build_set(tmp_path / "set", storage, [make_samples(counts=(2, 3, 1))])
    good = _record(out)
    record = json.loads(json.dumps(good))
    entry = record["sample_index"][1]
    if storage == "wds":
        entry["offset"] += 512
        phrase = f"sample 0001: offset {entry['offset']} (the shard: {entry['offset'] - 512})"
    else:
        entry["regions"] += 1
        phrase = "sample 0001: regions 4 (the shard: 3)"
    write_json_atomic(out / record_name(0), record)
    assert verify_shardset(out) == [f"{record_name(0)}: the per-sample index disagrees with {shard_name(0, storage)}: {phrase}"]
    record = json.loads(json.dumps(good))
    record["sample_index"][2]["xxh3"] ^= 0xFF
    write_json_atomic(out / record_name(0), record)
    assert [f.split(" (xxh3")[0] for f in verify_shardset(out)] == [f"{shard_name(0, storage)}: sample 0002: checksum mismatch"]
    del record["sample_index"]
    write_json_atomic(out / record_name(0), record)
    faults = verify_shardset(out)
    assert len(faults) == 1 and "no per-sample index" in faults[0] and f"regionspot shards reindex {out}" in faults[0]
    (out / record_name(0)).unlink()
    assert verify_shardset(out) == [f"{record_name(0)}: missing (it holds the shard's per-sample index); "
                                    f"run 'regionspot shards reindex {out}'"]  # fmt: skip


def _older(record: dict, version: int) -> dict:
    """A current record as an extraction of format `version` wrote it: 1, no index; 2, CRC-32C checksums."""
    if version == 1:
        return {k: v for k, v in record.items() if k not in ("layout", "sample_index")}
    index = [{("crc32c" if k == "xxh3" else k): (v & 0xFFFFFFFF if k == "xxh3" else v) for k, v in e.items()}
             for e in record["sample_index"]]  # fmt: skip
    return {**record, "sample_index": index}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("storage", ["wds", "zarr"])
def test_reindex_upgrades_an_older_set(tmp_path, storage, version):
    out = build_set(tmp_path / "set", storage, [make_samples(), make_samples(seed=1, start=5)])
    records = [_record(out, i) for i in range(2)]
    for i, record in enumerate(records):
        write_json_atomic(out / record_name(i), _older(record, version))
    (out / record_name(1)).unlink()  # and a record lost since
    manifest = read_manifest(out)
    write_json_atomic(out / MANIFEST, {**manifest, "version": version})
    said = "no" if version == 1 else "an older"
    with pytest.raises(RegionSpotError, match=f"format version {version} has {said} per-sample index; run 'regionspot shards reindex {out}'"):
        ShardSet(out)
    assert "regionspot shards reindex" in verify_shardset(out)[0]
    r = CliRunner().invoke(app, ["shards", "reindex", str(out)])
    assert r.exit_code == 0, r.output
    assert f"indexed: 2 shards, 10 images (format version {SCHEMA_VERSION})" in r.output
    assert [_record(out, i) for i in range(2)] == [records[0], {**records[1], "skipped": []}]
    assert read_manifest(out) == manifest and verify_shardset(out) == []
    flip_byte(out / shard_name(0, storage) if storage == "wds" else max(
        (f for f in (out / ZARR).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size))
    with pytest.raises(RegionSpotError, match=f"{shard_name(0, storage)}: its bytes differ from the manifest's sha256"):
        CliRunner().invoke(app, ["shards", "reindex", str(out)], catch_exceptions=False)
